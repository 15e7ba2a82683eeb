"""The deltas refined together on the model's outputs (hparams refine_steps, editor/refine.py)."""

import json

import pytest
import torch

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.architectures import ARCHITECTURES
from memit_vllm.core.records import load_requests, parse_record
from memit_vllm.core.tokens import target_ids
from memit_vllm.editor import edit, load_editable
from memit_vllm.editor.hparams import HParams
from memit_vllm.editor.refine import DeltaTerms, Refiner
from memit_vllm.errors import MemitError
from memit_vllm.patch import load_patch
from memit_vllm.patch.merge import PatchSet

CORPUS = "corpus/smollm2_self_2k.jsonl"
FAST = {"v_num_grad_steps": 4, "context_template_seeds": ["The", "I"], "context_template_length": 5}


def tiny_edit(model, data_dir, tmp_path, hparams=None, **kw):
    return edit(model, load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=3),
                hparams={**FAST, **(hparams or {})}, stats_corpus=str(data_dir / CORPUS), stats_tokens=3000,
                cache_dir=tmp_path / "cache", neighbour_subjects="vocab:50", progress=False, **kw)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: a Conv1D down-projection, its weight transposed
def test_what_is_refined_is_what_the_merged_weights_serve(arch, tiny_models):
    """The trainable term x D^T on each down-projection's output equals D merged into its weight, and the
    term switched off is the model as it was: the objective's model is the one the patch serves."""
    tok, em = load_editable(Checkpoint(tiny_models[arch]))
    ids = torch.tensor([tok("The Eiffel Tower is located in the city of")["input_ids"]])
    gen = torch.Generator().manual_seed(0)
    deltas = {l: 0.05 * torch.randn(em.d_model, em.d_ff, generator=gen) for l in (1, 2)}
    with torch.no_grad():
        plain = em.model(ids).logits
        terms = DeltaTerms(em, deltas)
        with_terms = em.model(ids).logits
        with terms.off():
            off = em.model(ids).logits
        terms.remove()
        for layer, delta in deltas.items():
            em.add_to_weight(layer, delta)
        merged = em.model(ids).logits
    assert torch.equal(off, plain)
    assert not torch.allclose(with_terms, plain, atol=1e-3)
    torch.testing.assert_close(with_terms, merged, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 4])  # 1: the unedited distributions kept; 4: read beside each step's
def test_preserved_prompts_of_any_length_are_compared_with_their_own_unedited_distributions(tokens, tiny_models,
                                                                                            data_dir):
    """The prompts are read in batches of similar length, not in the pool's order, and with
    refine_neighbour_tokens > 1 continued by the unedited model's greedy tokens: each position must still be
    compared with its own unedited distribution, so with the deltas at zero every KL is zero."""
    tok, em = load_editable(Checkpoint(tiny_models["llama"]))
    requests = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=3)
    prompts = [" ".join(["word"] * n) + " is located in" for n in (1, 30, 2, 17, 5, 30, 1, 9)]
    hp = HParams(layers=[1, 2], mom2_update_weight=1.0, refine_steps=1, refine_neighbour_tokens=tokens)
    refiner = Refiner(em, tok, hp, requests, prompts, corpus=None, seed=0)
    terms = DeltaTerms(em, {l: torch.zeros(em.d_model, em.d_ff) for l in (1, 2)})
    try:
        refiner.prepare(terms)
        with torch.no_grad():
            kl = refiner._prompt_kl(terms, list(range(len(prompts))))
            continued = [tok(p)["input_ids"] + [int(em.model(torch.tensor([tok(p)["input_ids"]])).logits[0, -1]
                                                    .argmax())] for p in prompts]
    finally:
        terms.remove()
    lengths = [len(p) for p in refiner.prompts]
    assert lengths != sorted(lengths) and abs(float(kl)) < 1e-4
    assert refiner.tails == [tokens] * len(prompts)
    if tokens > 1:  # each prompt continued by the unedited model's own greedy tokens
        assert [p[:len(c)] for p, c in zip(refiner.prompts, continued)] == continued
        assert all(len(p) == len(tok(q)["input_ids"]) + tokens - 1 for p, q in zip(refiner.prompts, prompts))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_refined_patch_is_reproducible_and_other_than_the_solve(arch, tiny_models, data_dir, tmp_path, monkeypatch):
    """refine_steps moves the solved deltas (the patch records the steps and the report their losses), in the
    checkpoint's layout; the same seed gives the same bytes; 0 steps is the solve alone."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model = tiny_models[arch]
    plain = tiny_edit(model, data_dir, tmp_path, resume_dir=tmp_path / "z")
    steps = {"refine_steps": 3, "refine_lr": 1e-2}
    first = tiny_edit(model, data_dir, tmp_path, hparams=steps, resume_dir=tmp_path / "z")
    again = tiny_edit(model, data_dir, tmp_path, hparams=steps, resume_dir=tmp_path / "z")
    assert first.report.z_resumed == 3 and first.patch.hparams["refine_steps"] == 3
    assert first.report.refine["steps"] == 3 and first.report.refine["texts"] > 16
    assert first.report.refine["prompts"] == 3 * 10  # vocab:50 neighbours, 10 per edit at 3 edits
    assert plain.report.refine == {} and plain.patch.hparams["refine_steps"] == 0
    assert first.patch.save(tmp_path / "a.patch").read_bytes() == again.patch.save(tmp_path / "b.patch").read_bytes()
    ckpt = Checkpoint(model)
    PatchSet([first.patch]).validate(ckpt)
    for name, delta in first.patch.deltas.items():
        assert delta.shape == ckpt.tensor(name).shape == plain.patch.deltas[name].shape
        assert not torch.equal(delta, plain.patch.deltas[name])
        assert (delta - plain.patch.deltas[name]).norm() < delta.norm()  # started from the solve


def layered(deltas: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """A Llama patch's deltas by layer."""
    return {ARCHITECTURES["llama"].layer_of(name): d for name, d in deltas.items()}


def test_refining_smollm2s_patch_lowers_its_kl_and_keeps_every_edit(smollm2, data_dir, tmp_path):
    """The real model, 10 CounterFact edits with its preset and its neighbour prompts (all of them read every
    step): the steps take the neighbours' next-token KL and the edits' CE down together, and
    every edit continues with its new target once the patch is saved and merged. (What this buys on unseen
    text and prompts is measured by `memit-vllm eval --generate`: docs/hyperparameters.md, "Session 31".)"""
    requests = tmp_path / "ten.json"
    requests.write_text(json.dumps(json.loads((data_dir / "counterfact" / "counterfact_500.json").read_text())[:10]))
    made = edit(smollm2, requests, hparams={"refine_steps": 8, "refine_lr": 1e-4},
                stats_corpus=str(data_dir / CORPUS), stats_tokens=226350, progress=False)
    first, last = made.report.refine["first_step"], made.report.refine["last_step"]
    assert made.report.refine["prompts"] == 100 and last["kl_neighbours"] < 0.95 * first["kl_neighbours"], first
    assert last["edit_ce"] < first["edit_ce"], (first, last)
    refined = load_patch(made.patch.save(tmp_path / "refined.patch"))
    tok, em = load_editable(Checkpoint(smollm2))
    for layer, delta in layered(refined.deltas).items():
        em.add_to_weight(layer, delta)
    with torch.no_grad():
        for r in (parse_record(r, "request") for r in refined.requests):
            ids = torch.tensor([tok(r.text())["input_ids"]])
            assert em.model(ids).logits[0, -1].argmax() == target_ids(tok, r.target_new)[0], r


def test_refine_steps_are_refused_where_they_cannot_run_before_the_model_loads(tiny_models, data_dir, tmp_path):
    with pytest.raises(MemitError, match="refine_steps must be an integer >= 0"):
        tiny_edit(tiny_models["llama"], data_dir, tmp_path, hparams={"refine_steps": -1})
    with pytest.raises(MemitError, match="refine_steps is not yet measured under --device-map: set refine_steps to 0"):
        tiny_edit(tiny_models["llama"], data_dir, tmp_path, hparams={"refine_steps": 2}, device_map="auto")
