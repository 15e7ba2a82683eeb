"""`eval --generate` on cases whose answer is known: the pure metric functions on hand-made completions,
the transformers scorer's greedy completions and KL against plain computations, and the CLI on SmolLM2
prompts whose greedy completions are known and on patches that change nothing or much."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.cli import main
from memit_vllm.evaluate.generation import HELDOUT_TEXTS, covariance_budget, heldout_texts
from memit_vllm.evaluate.metrics import (
    GENERATION_METRICS,
    Completion,
    GeneratedRecord,
    first_word,
    hit_metrics,
    kept_metrics,
    target_hit,
    topk_kl,
)
from memit_vllm.evaluate.patching import load_model, merge_into_model, swapped
from memit_vllm.evaluate.scoring import TransformersScorer
from memit_vllm.testing.server import hf_greedy
from memit_vllm.testing.synthetic import synthetic_patch


def c(tokens, text="", margin=0.0) -> Completion:
    return Completion(tuple(tokens), text, margin)


# -- the pure metrics ----------------------------------------------------------------------------------
def test_target_hit_is_token_level():
    assert target_hit(c([5, 6, 7]), (5, 6))
    assert not target_hit(c([5]), (5, 6))  # cut short (an EOS) before the target ends
    assert not target_hit(c([6, 5, 6]), (5, 6))  # the target later on is not a start
    assert not target_hit(c([5]), ())


def test_first_word():
    assert first_word(" Paris.\n\nThe answer") == "Paris"
    assert first_word("\n\nThe answer") == "The"
    assert first_word(", and then") == ","
    assert first_word("") == ""


def test_hit_metrics_average_per_record_first():
    records = [GeneratedRecord(rewrite=[(c([1, 2]), (1,))], paraphrase=[(c([1]), (1,)), (c([2]), (1,))]),
               GeneratedRecord(rewrite=[(c([3]), (1,))], paraphrase=[(c([1, 9]), (1, 9))])]
    assert hit_metrics(records) == {"rewrite_hit": 0.5, "paraphrase_hit": 0.75}


def test_kept_metrics_compare_first_words_tokens_and_confident_prompts():
    same = (c([1, 2], " Paris is"), c([1, 2], " Paris is"))
    word_only = (c([1, 2], " Paris is", margin=0.9), c([1, 3], " Paris was"))
    flipped = (c([1], " Paris", margin=0.5), c([4], " Rome"))
    unsure_flip = (c([1], " Paris", margin=0.1), c([4], " Rome"))
    records = [GeneratedRecord([], [], neighbours=[same, word_only]), GeneratedRecord([], [], neighbours=[flipped])]
    m = kept_metrics(records, [same, word_only, flipped, unsure_flip])
    assert m["neighbour_word_kept"] == pytest.approx((1 + 0) / 2)  # record 1: both words kept; record 2: none
    assert m["neighbour_kept"] == pytest.approx((0.5 + 0) / 2)
    assert m["unrelated_word_kept"] == 0.5 and m["unrelated_kept"] == 0.25
    # confident (unedited margin >= 0.3): word_only (kept) and flipped (not)
    assert m["unrelated_word_kept_confident"] == 0.5
    assert set(kept_metrics(records, [])) == {"neighbour_word_kept", "neighbour_kept"}


def _logprobs(probs: dict[int, float]) -> dict[int, float]:
    return {i: math.log(p) for i, p in probs.items()}


def test_topk_kl_is_exact_on_full_lists_and_a_lower_bound_on_top_k():
    p = {0: 0.5, 1: 0.3, 2: 0.2}
    q = {0: 0.2, 1: 0.3, 2: 0.5}
    exact = sum(p[i] * math.log(p[i] / q[i]) for i in p)
    assert topk_kl(_logprobs(p), _logprobs(q)) == pytest.approx(exact)
    assert topk_kl(_logprobs(p), _logprobs(p)) == pytest.approx(0.0, abs=1e-12)
    # Only {0} is common to the top-2 lists: buckets {0}, rest.
    top_p, top_q = _logprobs({0: 0.5, 1: 0.3}), _logprobs({2: 0.5, 0: 0.2})
    grouped = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert topk_kl(top_p, top_q) == pytest.approx(grouped)
    assert 0 < grouped < exact
    torch.manual_seed(0)
    for _ in range(20):
        lp, lq = torch.log_softmax(torch.randn(2, 50) * 2, -1)
        full = (lp.exp() * (lp - lq)).sum().item()
        tp, tq = lp.topk(5), lq.topk(5)
        estimate = topk_kl(dict(zip(tp.indices.tolist(), tp.values.tolist())),
                           dict(zip(tq.indices.tolist(), tq.values.tolist())))
        assert -1e-6 <= estimate <= full + 1e-6


# -- the transformers scorer -----------------------------------------------------------------------------
PROMPTS = ["The capital of France is", "A", "Danielle Darrieux's mother tongue is", "nq question: who wrote it"]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    model, tok = load_model(Checkpoint(tiny_models["llama"]))
    return model, tok, TransformersScorer(model, tok, batch_size=3, progress=False)


def test_greedy_equals_one_prompt_at_a_time_with_margins(tiny, tiny_models):
    model, tok, scorer = tiny
    got = scorer.greedy(PROMPTS, 6)
    assert [list(x.tokens) for x in got] == hf_greedy(tiny_models["llama"], PROMPTS, 6)
    for prompt, x in zip(PROMPTS, got):
        with torch.no_grad():
            probs = torch.softmax(model(**tok(prompt, return_tensors="pt")).logits[0, -1], -1)
        p1, p2 = probs.topk(2).values.tolist()
        assert x.margin == pytest.approx(p1 - p2, abs=1e-5)
        assert x.text == tok.decode(x.tokens, skip_special_tokens=True)


def test_greedy_ends_at_the_eos(tiny):
    model, _, scorer = tiny
    first = scorer.greedy(PROMPTS[:1], 1)[0].tokens[0]
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first  # the first greedy token now ends the completion
    try:
        assert scorer.greedy(PROMPTS[:1], 6)[0].tokens == (first,)
    finally:
        model.generation_config.eos_token_id = eos


def test_heldout_kl_against_a_plain_computation(tiny_models, tmp_path):
    ckpt = Checkpoint(tiny_models["llama"])
    base, tok = load_model(ckpt)
    edited, _ = load_model(ckpt)
    patch = synthetic_patch(tiny_models["llama"], layers=(1, 2), rank=4, scale=50.0)
    unedited = merge_into_model(edited, ckpt, [patch])
    texts = [tok(t)["input_ids"] for t in ("The Eiffel Tower is in Paris, France.", "Water boils at", "A b")]
    scorer = TransformersScorer(edited, tok, progress=False)
    merged = {name: edited.get_parameter(name).detach().clone() for name in unedited}
    exact, estimate = scorer.heldout_kl(texts, lambda: swapped(edited, unedited), batch_size=2)
    total, positions = 0.0, 0
    with torch.no_grad():
        for ids in texts:
            lp, lq = (torch.log_softmax(m(torch.tensor([ids])).logits[0, :-1], -1) for m in (base, edited))
            total += (lp.exp() * (lp - lq)).sum().item()
            positions += len(ids) - 1
    assert exact == pytest.approx(total / positions, rel=1e-4) and exact > 0
    assert 0 <= estimate <= exact
    assert scorer.heldout_kl(texts, lambda: swapped(edited, {})) == (0.0, 0.0)  # the model against itself
    for name, value in merged.items():  # the edited weights are back after every batch
        assert torch.equal(edited.get_parameter(name), value)


def test_heldout_slice_and_covariance_budget(tiny_models, tmp_path):
    texts = [f"text {i} " + "word " * (i % 7) for i in range(HELDOUT_TEXTS + 30)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert heldout_texts(corpus) == texts[-HELDOUT_TEXTS:]
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    assert covariance_budget(tok, corpus) == sum(len(tok(t)["input_ids"]) for t in texts[:30])


# -- the CLI ------------------------------------------------------------------------------------------
def run_cli(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def counterfact(subject: str, target_new: str, paraphrases: list[str], neighbours: list[str]) -> dict:
    return {"case_id": subject, "requested_rewrite": {"prompt": "The capital of {} is", "subject": subject,
                                                      "target_new": {"str": target_new}, "target_true": {"str": "X"}},
            "paraphrase_prompts": paraphrases, "neighborhood_prompts": neighbours}


def test_known_completions_of_smollm2(smollm2, tmp_path):
    """Unedited SmolLM2's greedy answers (checked by hand): "The capital of France is" -> " Paris.",
    "The capital city of France is" -> " Paris.", "France's capital is" -> " New York City.", "The capital
    of Germany is" -> " Berlin."; of the unrelated prompts only the ocean one is confident (margin 0.38;
    hydrogen 0.25, Eiffel 0.05)."""
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([
        counterfact("France", "Paris", ["The capital city of France is", "France's capital is"], ["A"]),
        counterfact("Germany", "Paris", ["The capital city of France is"], ["B"])]))
    unrelated = tmp_path / "unrelated.json"
    unrelated.write_text(json.dumps(["The largest ocean on Earth is the", "Water is made of hydrogen and",
                                     {"prompt": "The Eiffel Tower is located in"}]))
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("The capital of France is Paris.\n\nWater is made of hydrogen and oxygen.\n")
    result = run_cli("--model", smollm2, "--data", data, "--generate", "--unrelated", unrelated, "--heldout", heldout,
                     "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    before = report["before"]
    assert before["rewrite_hit"] == 0.5  # Paris after France, not after Germany
    assert before["paraphrase_hit"] == pytest.approx((0.5 + 1) / 2)
    assert before["neighbour_kept"] == before["unrelated_word_kept"] == before["unrelated_word_kept_confident"] == 1
    assert "after" not in report and "heldout_kl" not in before  # no edited model: nothing to compare
    info = report["generation"]
    assert info["unrelated_prompts"] == 3 and info["unrelated_confident"] == 1 and info["new_tokens"] == 8
    assert info["heldout"]["texts"] == 2 and info["heldout"]["covariance_overlap"] is None


@pytest.mark.parametrize("scale", [0.0, 50.0])
def test_a_patch_that_changes_nothing_keeps_everything(tiny_models, data_dir, tmp_path, scale):
    patch = synthetic_patch(tiny_models["llama"], layers=(1, 2), rank=4, scale=scale).save(tmp_path / "p.patch")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("One text about the sea.\n\nAnother one, about the mountains and the rivers.\n")
    result = run_cli("--model", tiny_models["llama"], "--patch", patch, "--data",
                     data_dir / "counterfact" / "counterfact_500.json", "--n", 2, "--generate", "--new-tokens", 4,
                     "--heldout", heldout, "--json", tmp_path / "r.json", "--plot", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    after = report["after"]
    assert set(after) >= set(GENERATION_METRICS) - {"unrelated_word_kept_confident"}
    assert report["generation"]["unrelated_prompts"] == 100  # records 2..101 of the data file
    kept = [after[k] for k in ("neighbour_word_kept", "neighbour_kept", "unrelated_word_kept", "unrelated_kept")]
    if scale == 0:
        assert kept == [1, 1, 1, 1] and after["heldout_kl"] == after["heldout_kl_top20"] == 0
        assert report["delta"]["rewrite_hit"] == report["delta"]["paraphrase_hit"] == 0
    else:
        assert max(kept) < 1 and after["heldout_kl"] > 0
    assert "unrelated prompts" in result.output and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_generation_input_exits_2(tiny_models, data_dir, tmp_path):
    data = data_dir / "counterfact" / "counterfact_500.json"
    result = run_cli("--model", tiny_models["llama"], "--data", data, "--n", 1, "--generate", "--heldout",
                     tmp_path / "missing.txt")
    assert result.exit_code == 2 and "expected an existing .txt or .jsonl file" in result.stderr
    (tmp_path / "u.json").write_text("[]")
    result = run_cli("--model", tiny_models["llama"], "--data", data, "--n", 1, "--generate", "--unrelated",
                     tmp_path / "u.json")
    assert result.exit_code == 2 and "holds no prompts" in result.stderr
    result = run_cli("--model", tiny_models["llama"], "--data", data, "--n", 1, "--generate", "--unrelated",
                     tmp_path / "u.json", "--unrelated-count", 5)
    assert result.exit_code == 2 and "--unrelated-count 5 counts the default unrelated prompts" in result.stderr
    result = run_cli("--model", tiny_models["llama"], "--data", data, "--n", 1, "--unrelated-count", 5)
    assert result.exit_code == 2 and "--unrelated-count only applies to the generated" in result.stderr


def test_unrelated_count_takes_that_many_later_records(tiny_models, data_dir, tmp_path):
    """`--unrelated-count N`: the edit prompts of the N records after the first --n, and the report says
    how well a share of N prompts is known (a share of 100 to about +-10 points: eval's default)."""
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("One text about the sea.\n\nAnother one, about the mountains.\n")
    result = run_cli("--model", tiny_models["llama"], "--data", data_dir / "counterfact" / "counterfact_500.json",
                     "--n", 2, "--generate", "--new-tokens", 2, "--unrelated-count", 7, "--heldout", heldout,
                     "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "r.json").read_text())["generation"]
    assert info["unrelated_prompts"] == 7 and info["unrelated"].startswith("edit prompts of records 2..")
    assert "7 unrelated prompts" in result.output and "+-37 points (95%)" in result.output


def test_zsre_alt_targets_with_the_default_unrelated_prompts(tiny_models, data_dir, tmp_path):
    """The unrelated prompts come from the file's later records, of which only the questions are used:
    records whose `alt` is empty (two in zsre_mend_train_1k) must not stop an `--zsre-target alt` run."""
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("One text about the sea.\n\nAnother one, about the mountains.\n")
    result = run_cli("--model", tiny_models["llama"], "--data", data_dir / "zsre" / "zsre_mend_train_1k.json",
                     "--zsre-target", "alt", "--n", 2, "--generate", "--new-tokens", 2, "--heldout", heldout,
                     "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["generation"]["unrelated_prompts"] == 100
