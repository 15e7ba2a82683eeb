"""export-lora: a patch as the PEFT adapter vLLM loads (--enable-lora), checked offline (no vLLM here).

The layout asserted is the one ../shared/memit-reference.md section 7 gives for vLLM 0.32:
adapter_config.json (r, lora_alpha, target_modules) + adapter_model.safetensors with
base_model.model.model.layers.N.mlp.down_proj.lora_A.weight [r, d_ff] and lora_B.weight [d_model, r].
"""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from memit_vllm import make_patch
from memit_vllm.cli import main
from memit_vllm.editor import load_requests
from memit_vllm.core.architectures import ARCHITECTURES, lora_classes
from memit_vllm.core.contract import LORA_METADATA_FILE
from memit_vllm.lora_export import CONFIG_FILE, WEIGHTS_FILE
from memit_vllm.patch import BaseModel, Patch, load_patch
from memit_vllm.testing.synthetic import facts, synthetic_patch

N_EDITS = 3
FAST = {"v_num_grad_steps": 4, "context_template_seeds": ["The"], "context_template_length": 5}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def export(*args) -> dict:
    out = cli("export-lora", *args, "--json")
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def refused(patch, out, *args) -> str:
    """Run an export that must fail: exit 2, one-line message, no adapter dir and no temp dir left."""
    r = cli("export-lora", patch, "--out", out, *args)
    assert r.exit_code == 2, r.output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return r.output


@pytest.fixture(scope="module")
def llama_patch(tiny_models, data_dir, tmp_path_factory):
    """A real MEMIT patch (3 CounterFact edits) on the tiny Llama."""
    tmp = tmp_path_factory.mktemp("lora")
    requests = load_requests(data_dir / "counterfact/counterfact_500.json", limit=N_EDITS)
    patch = make_patch(tiny_models["llama"], requests, hparams=FAST, cache_dir=tmp, progress=False,
                       stats_corpus=str(data_dir / "corpus/smollm2_self_2k.jsonl"), stats_tokens=3000)
    return patch.save(tmp / "facts.patch")


def read_adapter(out):
    with safe_open(out / WEIGHTS_FILE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads((out / CONFIG_FILE).read_text()), tensors


def test_adapter_layout_and_exact_reconstruction(llama_patch, tmp_path):
    out = tmp_path / "adapter"
    report = export(llama_patch, "--out", out)
    patch = load_patch(llama_patch)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, LORA_METADATA_FILE])

    config, tensors = read_adapter(out)
    r = config["r"]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["down_proj"] and config["bias"] == "none"
    assert config["lora_alpha"] == r and config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == patch.base.name_or_path
    assert 1 <= r <= N_EDITS and report["r"] == r

    layers = {int(n.split(".")[2]): n for n in patch.layers}
    assert config["layers_to_transform"] == sorted(layers)
    prefix = "base_model.model.model.layers.{}.mlp.down_proj.lora_{}.weight"
    assert set(tensors) == {prefix.format(i, ab) for i in layers for ab in "AB"}
    for i, name in layers.items():
        delta = patch.deltas[name].double()
        a, b = tensors[prefix.format(i, "A")], tensors[prefix.format(i, "B")]
        assert a.dtype == b.dtype == torch.float32
        assert a.shape == (r, delta.shape[1]) and b.shape == (delta.shape[0], r)  # [r, d_ff], [d_model, r]
        merged = b.double() @ a.double() * (config["lora_alpha"] / r)
        assert (merged - delta).norm() / delta.norm() < 1e-6

    for layer in report["layers"]:
        assert layer["rank"] <= N_EDITS and layer["rel_error"] < 1e-6 and not layer["truncated"]
    meta = json.loads((out / LORA_METADATA_FILE).read_text())
    assert meta["patch_id"] == patch.patch_id
    assert [x["rel_error"] for x in meta["layers"]] == [x["rel_error"] for x in report["layers"]]


def test_max_rank_truncates_and_reports_the_error(llama_patch, tmp_path):
    report = export(llama_patch, "--out", tmp_path / "a", "--max-rank", 1)
    patch = load_patch(llama_patch)
    assert report["r"] == 1 and report["truncated"]
    for layer in report["layers"]:
        s = torch.linalg.svdvals(patch.deltas[layer["name"]].double())
        expected = float(s[1:].norm() / s.norm())  # Eckart-Young: the dropped singular values
        assert layer["rank"] == 1 and layer["truncated"] and layer["numerical_rank"] > 1
        assert layer["rel_error"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    text = cli("export-lora", llama_patch, "--out", tmp_path / "b", "--max-rank", 1)
    assert text.exit_code == 0 and "truncated from" in text.output and "rel error" in text.output


@pytest.fixture
def one_thread():
    """LAPACK's threaded SVD of a 520x600 matrix takes seconds instead of 0.1 s when the (shared) cores
    are busy: keep this test fast whatever else runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_rank_above_vllm_max_is_refused_unless_max_rank(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.down_proj.weight"
    big = Patch(deltas={name: torch.randn(520, 600, generator=g)}, requests=facts("big", 600),
                base=BaseModel("tiny-llama", "LlamaForCausalLM", "0" * 64), base_weights={name: "0" * 64})
    path = big.save(tmp_path / "big.patch")
    assert "--max-rank" in refused(path, tmp_path / "out")
    report = export(path, "--out", tmp_path / "out", "--max-rank", 512)
    assert report["r"] == 512 and report["layers"][0]["numerical_rank"] == 520
    assert 0 < report["layers"][0]["rel_error"] < 1


@pytest.mark.parametrize("arch", sorted(t for t, a in ARCHITECTURES.items() if a.vllm_lora))
def test_supported_architectures(arch, tiny_models, tmp_path):
    path = synthetic_patch(tiny_models[arch], rank=2).save(tmp_path / "p.patch")
    report = export(path, "--out", tmp_path / "out")
    assert report["r"] == 2 and report["max_rel_error"] < 1e-6


@pytest.mark.parametrize("arch", sorted(t for t, a in ARCHITECTURES.items() if not a.vllm_lora))
def test_architectures_without_vllm_mlp_lora_are_refused(arch, tiny_models, tmp_path):
    path = synthetic_patch(tiny_models[arch]).save(tmp_path / "p.patch")
    msg = refused(path, tmp_path / "out")
    assert msg.startswith("error:") and msg.count("\n") == 1
    assert all(a in msg for a in lora_classes())


def test_a_full_disk_is_one_line_naming_the_adapter(tiny_models, tmp_path, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError, which no `except OSError` caught: a traceback."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    patch = synthetic_patch(tiny_models["llama"]).save(tmp_path / "p.patch")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert refused(patch, tmp_path / "out") == \
        f"error: cannot write the adapter to {tmp_path / 'out'}: No space left on device\n"


def test_existing_output_and_bad_max_rank_are_refused(llama_patch, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli("export-lora", llama_patch, "--out", out).exit_code == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert "1..512" in refused(llama_patch, tmp_path / "out", "--max-rank", 513)
