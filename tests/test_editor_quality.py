"""MEMIT on the real default model: 10 CounterFact edits take, generalise, and leave neighbours alone."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from memit_vllm.editor import default_hparams, load_requests
from memit_vllm.editor.memit import native_z
from memit_vllm.editor.precision import runs_natively
from memit_vllm.evaluate.run import evaluate
from memit_vllm.patch import load_patch


def assert_ten_edits_take(result: dict) -> None:
    """The bar for 10 edits: all take (ES 1.0), paraphrases mostly (PS >= 0.8), neighbours' NS within 5 points."""
    before, after = result["before"], result["after"]
    assert after["ES"] == 1.0, after
    assert after["PS"] >= 0.8, after
    assert after["NS"] >= before["NS"] - 0.05, (before, after)


def test_the_default_is_the_contained_setting_through_the_cli(smollm2, data_dir, tmp_path):
    """make-patch with no hparams, as a user runs it: the patch records SmolLM2's preset (the short z with its
    delivery margin, the model's own names as neighbours: docs/hyperparameters.md, "Session 19"), and the 10
    edits take and generalise while their neighbours keep NS within 5 points."""
    data = data_dir / "counterfact" / "counterfact_500.json"
    requests = tmp_path / "ten.json"
    requests.write_text(json.dumps(json.loads(data.read_text())[:10]))
    out = tmp_path / "default.patch"
    made = subprocess.run(
        [sys.executable, "-m", "memit_vllm", "make-patch", "--model", str(smollm2), "--requests", str(requests),
         "--stats-corpus", str(data_dir / "corpus" / "smollm2_self_2k.jsonl"), "--out", str(out)],
        capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    patch = load_patch(out)
    # the preset as this CPU runs it: its bf16 z in the model's fp32 where bf16 is emulated, and said so
    preset, source = native_z(*default_hparams("llama", 30, 1536, n_edits=10), "cpu")
    assert source.startswith("measured, SmolLM2-135M, lambda x2.00 for 10 edits") and patch.hparams["source"] == source
    assert patch.hparams["mom2_update_weight"] == preset.mom2_update_weight == 768  # a small batch's ("Session 28")
    assert patch.hparams["z_dtype"] == preset.z_dtype == ("bfloat16" if runs_natively("bfloat16", "cpu") else None)
    assert (patch.hparams["v_optimizer"], patch.hparams["neighbour_subjects"]) == ("steepest_fisher", "model:2000")
    assert patch.hparams["own_prompt_weight"] == 0.125  # "Session 26"
    # 10 edits: 10 per edit; the own prompts' keys: every token of the 10 prompts but the subjects' last
    tok = AutoTokenizer.from_pretrained(smollm2)
    own_keys = sum(len(tok(r["prompt"].format(r["subject"]))["input_ids"]) - 1 for r in patch.requests)
    assert f"(--preserve, --neighbour-subjects: 10 per edit; {own_keys} of the edits' own prompts)" in made.stdout
    assert_ten_edits_take(evaluate(str(smollm2), data, [out], n=10))


def test_smollm2_lists_its_own_neighbour_names_once_per_seed(smollm2, data_dir, tmp_path, monkeypatch):
    """--neighbour-subjects model:N on the real model: N distinct names of the kinds facts are about, from the
    model's own lists; the same seed gives the same names, read back from the cache (a damaged cache file is
    listed again), and make-patch preserves each edit's prompt asked of them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memit_vllm.editor import edit, preserve

    tok, model = AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2)
    names = preserve.cached_model_subjects(tmp_path, "fingerprint", model, tok, 60, seed=0)
    assert len(names) == len(set(names)) == 60
    assert all(n[0].isupper() and len(n.split()) <= 5 for n in names), names
    cached = tmp_path / "subjects" / "fingerprint" / "model60-seed0.json"
    assert json.loads(cached.read_text()) == names
    with monkeypatch.context() as m:
        m.setattr(preserve, "model_subjects", lambda *a, **k: pytest.fail("listed again"))
        assert preserve.cached_model_subjects(tmp_path, "fingerprint", model, tok, 60, seed=0) == names
    cached.write_text("[")
    assert preserve.cached_model_subjects(tmp_path, "fingerprint", model, tok, 60, seed=0) == names

    result = edit(smollm2, load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=2),
                  stats_corpus=str(data_dir / "corpus" / "smollm2_self_2k.jsonl"), progress=False,
                  neighbour_subjects="model:60", neighbours_per_edit=3)
    assert result.report.preserved_keys > 0 and "neighbour_names" in result.report.seconds
