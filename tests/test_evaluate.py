"""memit-vllm eval: metric definitions on hand-computable cases, the batched scorer against a plain
loop, patches merged in memory, the report files, bad input, and unedited SmolLM2 on CounterFact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.cli import main
from memit_vllm.core.records import read_dataset
from memit_vllm.evaluate.metrics import (
    COUNTERFACT_METRICS,
    CounterFactScores,
    counterfact_metrics,
    ngram_entropy,
    zsre_metrics,
)
from memit_vllm.evaluate.patching import load_model, merge_into_model
from memit_vllm.evaluate.scoring import TransformersScorer, encode_pair
from memit_vllm.testing.synthetic import synthetic_patch

PAIRS = [("The capital of France is", "Paris"), ("Danielle Darrieux's mother tongue is", "French"),
         ("A", "very long target of many tokens indeed"), ("The Eiffel Tower is located in the city of", "Rome"),
         ("nq question: who wrote the big lebowski", "Joel Coen")]


def cf_path(data_dir):
    return data_dir / "counterfact" / "counterfact_500.json"


def run_cli(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


# -- metric definitions -----------------------------------------------------------------------------
def test_counterfact_metrics_by_hand():
    records = [
        CounterFactScores(rewrite=(1.0, 2.0), paraphrase=[(1.0, 2.0), (3.0, 2.0)],
                          neighborhood=[(2.0, 1.0), (1.0, 2.0)]),
        CounterFactScores(rewrite=(2.0, 0.5), paraphrase=[(0.2, 2.0)], neighborhood=[(3.0, 1.0)]),
    ]
    m = counterfact_metrics(records)
    e = math.exp
    assert m["ES"] == 0.5 and m["PS"] == 0.75 and m["NS"] == 0.75
    assert m["S"] == pytest.approx(3 / (1 / 0.5 + 2 / 0.75))
    assert m["ES_magnitude"] == pytest.approx(((e(-1) - e(-2)) + (e(-2) - e(-0.5))) / 2)
    assert m["PS_magnitude"] == pytest.approx(((e(-1) - e(-2) + e(-3) - e(-2)) / 2 + (e(-0.2) - e(-2))) / 2)
    assert m["NS_magnitude"] == pytest.approx(((e(-1) - e(-2) + e(-2) - e(-1)) / 2 + (e(-1) - e(-3))) / 2)
    assert "GE" not in m
    zero = counterfact_metrics([CounterFactScores(rewrite=(2.0, 1.0), paraphrase=[(1.0, 2.0)],
                                                  neighborhood=[(1.0, 2.0)])])
    assert zero["ES"] == 0 and zero["S"] == 0


def test_ngram_entropy_by_hand():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams (a b) x2, (b a) x1
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)  # trigrams: 2 distinct
    assert ngram_entropy("the cat the cat the cat the cat") < ngram_entropy("the cat sat on a mat by the door")
    records = [CounterFactScores((1.0, 2.0), [(1.0, 2.0)], [(2.0, 1.0)], generations=["a b a b", "a b c d"])]
    expected = (ngram_entropy("a b a b") + ngram_entropy("a b c d")) / 2
    assert counterfact_metrics(records)["GE"] == pytest.approx(expected)


def test_zsre_metrics_average_records():
    assert zsre_metrics([1.0, 0.5], [0.0, 0.5], [1.0, 1.0]) == {"efficacy": 0.75, "generalization": 0.25,
                                                                  "specificity": 1.0}


# -- tokenisation and the batched scorer -------------------------------------------------------------
class _BosTokenizer:
    """Adds BOS=1 like Llama-2's tokenizer does, also to a target tokenized without add_special_tokens=False."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] + [ord(c) for c in text]}


def test_encode_pair_keeps_prompt_bos_and_drops_target_bos():
    prompt, target = encode_pair(_BosTokenizer(), "ab", "c")
    assert prompt == [1, ord("a"), ord("b")] and target == [ord(" "), ord("c")]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_scores_match_a_plain_loop(tiny_models, arch):
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    batched = TransformersScorer(model, tok, batch_size=3, progress=False).score(PAIRS)
    for (prompt, target), got in zip(PAIRS, batched):
        p = tok(prompt)["input_ids"]
        t = tok(" " + target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + t])).logits[0]
        nll, hits = 0.0, 0
        for k, token in enumerate(t):
            row = logits[len(p) + k - 1]
            nll -= torch.log_softmax(row, -1)[token].item()
            hits += int(row.argmax().item() == token)
        assert got.nll == pytest.approx(nll / len(t), abs=1e-5)
        assert got.acc == pytest.approx(hits / len(t))


# -- data readers ------------------------------------------------------------------------------------
def test_readers(data_dir):
    fmt, cf = read_dataset(cf_path(data_dir), n=3)
    assert fmt == "counterfact" and len(cf) == 3
    assert cf[0].rewrite_prompt == "Angola is located in" and cf[0].target_new == "Antarctica"
    assert len(cf[0].paraphrase_prompts) == 2 and len(cf[0].neighborhood_prompts) == 10
    assert cf[0].neighborhood_true == "Africa"
    raw = json.loads((data_dir / "counterfact" / "counterfact_edit_10k.json").read_text())[:300]
    fmt, short = read_dataset(data_dir / "counterfact" / "counterfact_edit_10k.json", n=300)
    assert fmt == "counterfact-edit"
    assert [r.rewrite_prompt for r in short] == [r["prompt"] for r in raw]
    assert short[0].prompt == "The mother tongue of {} is" and short[0].neighborhood_true == "French"
    _, zs = read_dataset(data_dir / "zsre" / "zsre_mend_train_1k.json", n=2)
    _, zs_alt = read_dataset(data_dir / "zsre" / "zsre_mend_train_1k.json", n=2, zsre_target="alt")
    assert (zs[0].target, zs_alt[0].target, zs[0].loc_ans) == ("uniform", "unmanned aircraft", "Walter Sobchak")


# -- patches in memory -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patch_is_merged_into_the_model(tiny_models, arch):
    patch = synthetic_patch(tiny_models[arch], layers=(1,), scale=5.0)
    ckpt = Checkpoint(tiny_models[arch])
    model, _ = load_model(ckpt)
    merge_into_model(model, ckpt, [patch])
    (name,) = patch.deltas
    param = dict(model.named_parameters()).get(name)
    if param is None:  # checkpoint names may lack the base-model prefix
        param = model.get_parameter(f"{model.base_model_prefix}.{name}")
    torch.testing.assert_close(param.detach(), ckpt.tensor(name) + patch.deltas[name])


@pytest.fixture(scope="module")
def patched_run(tiny_models, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    patch = synthetic_patch(tiny_models["llama"], layers=(1, 2), rank=4, scale=50.0).save(out / "p.patch")
    result = run_cli("--model", tiny_models["llama"], "--patch", patch, "--data", cf_path(data_dir), "--n", 4,
                     "--json", out / "r.json", "--plot", out / "r.png")
    return result, out


def test_patch_changes_the_after_metrics(patched_run):
    result, out = patched_run
    assert result.exit_code == 0, result.output
    report = json.loads((out / "r.json").read_text())
    assert set(report["before"]) == set(report["after"]) == set(report["delta"]) == set(COUNTERFACT_METRICS) - {"GE"}
    assert report["before"] != report["after"]
    assert report["patches"][0]["patch_id"].startswith("mp1-") and report["n"] == 4
    assert "before" in result.output and "after" in result.output and "delta" in result.output


def test_plot_is_a_png(patched_run):
    _, out = patched_run
    import matplotlib.image

    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out / "r.png").shape[0] > 100


def test_zsre_and_fluency_through_the_cli(tiny_models, data_dir):
    result = run_cli("--model", tiny_models["gpt2"], "--data", data_dir / "zsre" / "zsre_mend_train_1k.json",
                     "--n", 3, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["zsre_target"] == "answers" and set(report["before"]) == {"efficacy", "generalization", "specificity"}
    result = run_cli("--model", tiny_models["llama"], "--data", cf_path(data_dir), "--n", 1, "--fluency", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["before"]["GE"] > 0


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_input_exits_2(tiny_models, data_dir, tmp_path):
    result = run_cli("--model", tiny_models["llama"], "--data", tmp_path / "missing.json")
    assert result.exit_code == 2 and "missing.json does not exist" in result.stderr
    (tmp_path / "odd.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    result = run_cli("--model", tiny_models["llama"], "--data", tmp_path / "odd.json")
    assert result.exit_code == 2 and f"{tmp_path / 'odd.json'} record 0: unknown data format" in result.stderr
    result = run_cli("--model", tiny_models["llama"], "--data", cf_path(data_dir), "--device", "bogus")  # RuntimeError
    assert result.exit_code == 2 and result.stderr == \
        "error: --device 'bogus' is not a torch device; use cpu, cuda or cuda:N\n"
    result = run_cli("--model", tiny_models["llama"], "--data", cf_path(data_dir), "--format", "zsre")  # was a KeyError
    assert result.exit_code == 2 and result.stderr == f"error: {cf_path(data_dir)} record 0: missing field 'src'\n"
    result = run_cli("--model", tiny_models["llama"], "--data", data_dir / "zsre" / "zsre_mend_train_1k.json",
                     "--fluency")
    assert result.exit_code == 2 and "generation_prompts" in result.stderr
    patch = synthetic_patch(tiny_models["llama"], layers=(1,)).save(tmp_path / "llama.patch")
    result = run_cli("--model", tiny_models["qwen2"], "--patch", patch, "--data", cf_path(data_dir), "--n", 1)
    assert result.exit_code == 2 and "was made for LlamaForCausalLM" in result.stderr


def test_a_full_disk_is_one_line_naming_the_output(tiny_models, data_dir, tmp_path, monkeypatch):
    """A write's ENOSPC names no file: the CLI showed it as a traceback (exit 1)."""
    from matplotlib.figure import Figure

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    png = tmp_path / "chart.png"
    result = run_cli("--model", tiny_models["llama"], "--data", cf_path(data_dir), "--n", 1, "--plot", png)
    assert result.exit_code == 2 and result.stderr.endswith(f"\nerror: cannot use {png}: No space left on device\n")
    assert list(tmp_path.iterdir()) == []


# -- the default model -------------------------------------------------------------------------------
def test_unedited_smollm2_on_counterfact(smollm2, data_dir, tmp_path):
    result = run_cli("--model", smollm2, "--data", cf_path(data_dir), "--n", 20, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    before = report["before"]
    assert set(before) == set(report["metrics"]) == set(COUNTERFACT_METRICS) - {"GE"} and "after" not in report
    # A peer measured ES 0.33, PS 0.38, NS 0.687 on the first 100 records; here 20 records.
    assert 0.05 <= before["ES"] <= 0.6 and 0.05 <= before["PS"] <= 0.6 and 0.55 <= before["NS"] <= 0.9
    assert before["ES_magnitude"] < 0 < before["NS_magnitude"]  # the true facts are more likely before an edit
