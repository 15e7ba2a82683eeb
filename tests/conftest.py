import os
from pathlib import Path

import pytest

from memit_vllm.default_models import prepare
from tiny_models import CONFIGS, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded default model (prepared by scripts/setup.sh; this only re-verifies it)."""
    return prepare("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch, smollm2) for arch in CONFIGS}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {DATA}: the tests read ../shared/data beside the checkout")
    return DATA
