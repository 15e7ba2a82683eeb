from pathlib import Path

import pytest

from memit_vllm.default_models import prepare
from memit_vllm.testing.tiny_models import CONFIGS, build_tiny_model

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


@pytest.fixture
def made_up_architecture(monkeypatch, tiny_models, tmp_path):
    """A copy of Llama's table entry under another model type, and a tiny checkpoint of it that
    transformers loads (a registered Llama subclass): what adding an architecture to the table takes."""
    import dataclasses
    import json
    import shutil

    import transformers

    from memit_vllm.core.architectures import ARCHITECTURES

    class MadeUpConfig(transformers.LlamaConfig):
        model_type = "madeup"

    class MadeUpForCausalLM(transformers.LlamaForCausalLM):
        config_class = MadeUpConfig

    if "madeup" not in transformers.CONFIG_MAPPING:
        transformers.AutoConfig.register("madeup", MadeUpConfig)
        transformers.AutoModelForCausalLM.register(MadeUpConfig, MadeUpForCausalLM)
    monkeypatch.setitem(ARCHITECTURES, "madeup", dataclasses.replace(
        ARCHITECTURES["llama"], model_type="madeup", hf_class="MadeUpForCausalLM"))
    model = tmp_path / "madeup"
    shutil.copytree(tiny_models["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="madeup", architectures=["MadeUpForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    return model
