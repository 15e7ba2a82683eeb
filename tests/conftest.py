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


@pytest.fixture(scope="session")
def facts_patch(smollm2, data_dir, tmp_path_factory) -> Path:
    """A real MEMIT patch of examples/facts.json on SmolLM2 (3 CounterFact records), made once per session
    for the serving tests (statistics come from the cache the editor tests fill)."""
    import json

    from memit_vllm import make_patch

    facts = json.loads((ROOT / "examples" / "facts.json").read_text())
    out = tmp_path_factory.mktemp("facts") / "facts.patch"
    return make_patch(smollm2, facts, stats_corpus=str(data_dir / "corpus" / "smollm2_self_2k.jsonl"),
                      name="facts", version="1", progress=False).save(out)
