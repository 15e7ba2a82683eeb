"""The deltas refined together on the model's outputs (hparams refine_steps, editor/refine.py)."""

import json
from dataclasses import replace

import pytest
import torch

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.architectures import ARCHITECTURES
from memit_vllm.core.records import load_requests, parse_record
from memit_vllm.core.tokens import target_ids
from memit_vllm.editor import edit, load_editable
from memit_vllm.editor.hparams import HParams
from memit_vllm.editor.refine import DeltaTerms, NeighbourDraws, Refiner
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


def test_neighbour_rows_are_drawn_afresh_from_the_whole_subject_pool(tiny_models, data_dir):
    """Each step's neighbour rows pair an edit's prompt with a subject drawn from the whole pool, so the steps
    see many of the pairs, not the few the solve held (a pool drawn again and again is fitted, not kept); the
    --preserve prompts are drawn beside them."""
    tok, em = load_editable(Checkpoint(tiny_models["llama"]))
    requests = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=3)
    subjects = [f"Name{i}" for i in range(40)]
    hp = HParams(layers=[1, 2], mom2_update_weight=1.0, refine_steps=1)
    refiner = Refiner(em, tok, hp, requests, ["The weather today is"], NeighbourDraws(subjects, rows=3), corpus=None,
                      seed=0)
    fixed = tuple(tok("The weather today is")["input_ids"])
    pairs = {tuple(tok(replace(r, subject=s).text())["input_ids"]) for r in requests for s in subjects}
    draws = [[tuple(row) for row in refiner._preserved_rows()] for _ in range(20)]
    assert all(len(rows) == 4 and rows.count(fixed) == 1 for rows in draws)  # 1 + 3 rows, all of them each step
    drawn = [row for rows in draws for row in rows if row != fixed]
    assert set(drawn) <= pairs and len(set(drawn)) > 30  # 60 draws of 120 pairs: the solve's 3 would be 3


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
    refined = first.report.refine  # vocab:50 neighbours, 10 per edit at 3 edits: drawn from all 50
    assert (refined["prompts"], refined["neighbour_rows"], refined["neighbour_subjects"]) == (0, 3 * 10, 50)
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
    """The real model, 10 CounterFact edits with its preset and its neighbour subjects (100 rows drawn each step
    from the model's names): the steps take the neighbours' next-token KL and the edits' CE down together, and
    every edit continues with its new target once the patch is saved and merged. (What this buys on unseen
    text and prompts is measured by `memit-vllm eval --generate`: docs/hyperparameters.md, "Session 31".)"""
    requests = tmp_path / "ten.json"
    requests.write_text(json.dumps(json.loads((data_dir / "counterfact" / "counterfact_500.json").read_text())[:10]))
    made = edit(smollm2, requests, hparams={"refine_steps": 8, "refine_lr": 1e-4},
                stats_corpus=str(data_dir / CORPUS), stats_tokens=226350, progress=False)
    first, last = made.report.refine["first_step"], made.report.refine["last_step"]
    assert made.report.refine["neighbour_rows"] == 100 and last["kl_neighbours"] < 0.95 * first["kl_neighbours"], first
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
