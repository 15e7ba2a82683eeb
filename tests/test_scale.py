"""The editor at scale: a model is edited in its own dtype (a bf16 checkpoint in bf16, no fp32 copy of
the model; the z delta, keys, covariance and solves kept in fp32/float64) and gives the patch of the
fp32 path within bf16's rounding; make-patch reports the memory a run took."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.editor import edit, load_requests, memit
from memit_vllm.editor.arch import model_dtype
from memit_vllm.errors import MemitError
from memit_vllm.patch import load_patch
from memit_vllm.testing.tiny_models import build_tiny_model

FAST = {"v_num_grad_steps": 6, "context_template_seeds": ["The", "I"], "context_template_length": 5}


@pytest.fixture(scope="module")
def bf16_llama(smollm2, tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("bf16") / "llama", smollm2, dtype=torch.bfloat16)


def run(model, data_dir, cache, **kw):
    requests = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=3)
    return edit(model, requests, hparams=FAST, stats_corpus=str(data_dir / "corpus" / "smollm2_self_2k.jsonl"),
                stats_tokens=3000, cache_dir=cache, progress=False, **kw)


def test_a_bf16_checkpoint_is_edited_in_bf16_and_matches_the_fp32_path(bf16_llama, data_dir, tmp_path, monkeypatch):
    seen = set()  # (dtype of every model parameter, dtype of the down-projection's input) at each forward

    def loaded(*args, **kwargs):
        tok, em = real_load(*args, **kwargs)
        params = list(em.model.parameters())
        for i in range(em.n_layers):
            em.down_proj(i).register_forward_pre_hook(
                lambda m, a: seen.add((frozenset(p.dtype for p in params), a[0].dtype)))
        return tok, em

    real_load = memit.load_editable
    monkeypatch.setattr(memit, "load_editable", loaded)
    assert Checkpoint(bf16_llama).dtype == "bfloat16"
    half = run(bf16_llama, data_dir, tmp_path / "bf16")
    assert seen == {(frozenset({torch.bfloat16}), torch.bfloat16)}, "stats, z and key reads all ran in bf16"
    seen.clear()
    full = run(bf16_llama, data_dir, tmp_path / "fp32", dtype="float32")  # the same weights, upcast exactly
    assert seen == {(frozenset({torch.float32}), torch.float32)}
    assert (half.patch.hparams["dtype"], full.patch.hparams["dtype"]) == ("bfloat16", "float32")
    assert half.patch.deltas.keys() == full.patch.deltas.keys()
    for name, delta in half.patch.deltas.items():
        assert delta.dtype == torch.float32  # deltas stay fp32; merged into bf16 weights when served
        # bf16 keeps 8 bits of mantissa: keys, hidden states and the z forward round at ~0.4%, which moves
        # each delta by 1.1-1.5% of its norm here (measured); 5% allows other seeds and BLAS builds
        assert (delta - full.patch.deltas[name]).norm() / full.patch.deltas[name].norm() < 0.05


def test_dtype_is_the_checkpoints_own_unless_given_and_others_are_refused(bf16_llama, tiny_models, tmp_path):
    assert model_dtype(Checkpoint(tiny_models["llama"])) == "float32"
    assert model_dtype(Checkpoint(bf16_llama), "float16") == "float16"
    odd = shutil.copytree(tiny_models["llama"], tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config.pop("dtype", None)
    (odd / "config.json").write_text(json.dumps({**config, "torch_dtype": "float64"}))
    with pytest.raises(MemitError, match="dtype 'float64': the editor loads models in float32, bfloat16, float16; "
                                         "pass --dtype"):
        model_dtype(Checkpoint(odd))
    assert model_dtype(Checkpoint(odd), "bfloat16") == "bfloat16"


def test_make_patch_reports_peak_memory_and_takes_dtype(bf16_llama, data_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "memit_vllm", "make-patch", "--model", str(bf16_llama), "--requests",
                          str(data_dir / "counterfact" / "counterfact_500.json"), "--limit", "1", "--dtype", "float32",
                          "--stats-corpus", str(data_dir / "corpus" / "smollm2_self_2k.jsonl"), "--stats-tokens",
                          "2000", "--layers", "1,2", "--cache-dir", str(tmp_path / "cache"), "--out",
                          str(tmp_path / "p.patch"), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    memory = json.loads(out.stdout)["memory"]
    weights = sum(f.stat().st_size for f in Checkpoint(bf16_llama).weight_files()) / 1024**3
    assert memory["checkpoint_gb"] == pytest.approx(weights, abs=1e-3)
    assert weights < memory["peak_rss_gb"] < 64  # the process holds the model (and torch) at its peak
    assert "gpu_peak_gb" not in memory  # CUDA never used
    assert load_patch(tmp_path / "p.patch").hparams["dtype"] == "float32"
