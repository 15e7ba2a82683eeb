"""The MEMIT editor: exactness of the batched z optimisation, patches for every architecture,
reproducibility, and validation before any heavy work."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.compat import check_transformers
from memit_vllm.core.tokens import length_buckets, target_ids
from memit_vllm.core.versions import ALLOW_UNTESTED_ENV
from memit_vllm.core.architectures import ARCHITECTURES
from memit_vllm.core.records import EditRequest
from memit_vllm.editor import EditableModel, HParams, edit, load_editable, load_requests, solve_layer_update
from memit_vllm.editor.hparams import LAMBDA_PER_DFF, default_hparams, load_hparams_file
from memit_vllm.editor import memit
from memit_vllm.editor.memit import KeyReader, Statistics, delivered_updates
from memit_vllm.editor.prompts import encode
from memit_vllm.editor.reference import plain_z_delta
from memit_vllm.editor.targets import (DELIVERY_SCALES, TargetResult, compute_targets,
                                      scaled_for_delivery, scaled_to_reach)
from memit_vllm.editor.trace import capture
from memit_vllm.errors import MemitError
from memit_vllm.patch import load_patch
from memit_vllm.patch.merge import PatchSet

ROOT = Path(__file__).resolve().parents[1]

TEMPLATES = ["{}", "Some text about things. {}", "Because it was late. {}"]
CORPUS = "corpus/smollm2_self_2k.jsonl"


def requests_from(data_dir, n):
    return load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=n)


@pytest.mark.parametrize("which", ["smollm2", "gptj", "gpt2"])
def test_batched_z_equals_plain_per_edit_optimisation(which, smollm2, tiny_models, data_dir):
    path = smollm2 if which == "smollm2" else tiny_models[which]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    em = EditableModel(model)
    reqs = requests_from(data_dir, 3 if which == "smollm2" else 4)
    reqs[1] = replace(reqs[1], paraphrases=("Some say that " + reqs[1].prompt,))  # one more rewrite row
    layer = 2 if which != "smollm2" else 6
    # A high early-stop loss on the real model makes edits finish at different steps.
    hp = HParams(layers=[layer], mom2_update_weight=1.0, v_num_grad_steps=10, z_batch_edits=4,
                 v_early_stop_loss=2.0 if which == "smollm2" else 0.05)
    batched = compute_targets(em, tok, reqs, TEMPLATES, layer, hp, progress=False)
    for i, r in enumerate(reqs):
        plain = plain_z_delta(model, tok, em.layers, r, TEMPLATES, layer, hp)
        assert plain.norm() > 0
        # fp32 roundoff differs between the two (batch shapes, cached prefix), and Adam's normalised
        # steps amplify it where a gradient is near zero (random tiny models): 0.1% of the norm at most.
        assert (batched.delta[i] - plain).norm() / plain.norm() < 1e-3
    if which == "smollm2":
        assert len(set(batched.steps.tolist())) > 1, "early stop should end edits at different steps"


def test_bf16_z_forward_reaches_the_fp32_targets_and_restores_the_model_exactly(smollm2, data_dir):
    """z_dtype=bfloat16 runs the layers above L in bf16 (2x faster on CPUs with AVX-512 BF16): the z found
    must be the fp32 path's up to bf16 rounding, and the fp32 model must come back bit for bit."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    em = EditableModel(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    reqs, layer = requests_from(data_dir, 3), 6
    hp = HParams(layers=[layer], mom2_update_weight=1.0, v_num_grad_steps=12, z_batch_edits=4)
    full = compute_targets(em, tok, reqs, TEMPLATES, layer, hp, progress=False)
    half = compute_targets(em, tok, reqs, TEMPLATES, layer, hp.replace(z_dtype="bfloat16"), progress=False)
    assert all(model.state_dict()[k].dtype == torch.float32 and torch.equal(model.state_dict()[k], v)
               for k, v in before.items())
    assert model.config._attn_implementation == attention
    assert half.z.dtype == half.delta.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(full.delta, half.delta, dim=1)
    assert cosine.min() > 0.95, cosine
    assert (full.target_prob - half.target_prob).abs().max() < 0.05, (full.target_prob, half.target_prob)
    assert (full.target_prob > 0.5).sum() >= 2  # the comparison includes edits that work


def test_most_probable_early_stop_ends_each_edit_once_its_target_is_the_argmax(smollm2, data_dir):
    """v_early_stop="most_probable": an edit stops once its target is the greedy choice after every
    templated prompt, with z in place; sooner and with a smaller delta than the loss rule."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    em = EditableModel(model)
    reqs, layer = requests_from(data_dir, 4), 6
    hp = HParams(layers=[layer], mom2_update_weight=1.0, v_num_grad_steps=25, v_early_stop="most_probable")
    greedy = compute_targets(em, tok, reqs, TEMPLATES, layer, hp, progress=False)
    loss = compute_targets(em, tok, reqs, TEMPLATES, layer, hp.replace(v_early_stop="loss"), progress=False)
    assert (greedy.steps <= loss.steps).all() and greedy.steps.sum() < loss.steps.sum()
    # an edit whose delta reaches the clamp (clamp_norm_factor) under both rules has the clamp's norm in both
    assert (greedy.delta.norm(dim=1) <= loss.delta.norm(dim=1) * (1 + 1e-6)).all()
    assert greedy.delta.norm(dim=1).sum() < loss.delta.norm(dim=1).sum()

    def argmax_with(delta, request, template):
        enc = encode(tok, template, request)
        at = torch.tensor([enc.lookup])
        hook = em.layers[layer].register_forward_hook(  # z = h + delta at the subject's last token
            lambda m, i, out: (out[0].index_add(1, at, delta[None, None]), *out[1:]) if isinstance(out, tuple)
            else out.index_add(1, at, delta[None, None]))
        try:
            return model(torch.tensor([enc.ids])).logits[0, -1].argmax().item()
        finally:
            hook.remove()

    stopped = [i for i in range(len(reqs)) if greedy.steps[i] < hp.v_num_grad_steps]
    assert stopped
    for i in stopped:
        first = target_ids(tok, reqs[i].target_new)[0]
        assert all(argmax_with(greedy.delta[i], reqs[i], t) == first for t in TEMPLATES), reqs[i]


def test_steepest_descent_reaches_the_early_stop_with_shorter_deltas_than_adam(smollm2, data_dir):
    """v_optimizer="steepest": every step moves a delta v_step x |h| along its negative gradient (one step
    gives exactly that norm), and the edits reach the loss Adam reaches with shorter deltas: Adam's
    per-coordinate steps grow sign-like vectors, whose extra length leaks to other keys."""
    tok, em = load_editable(Checkpoint(smollm2))
    reqs, layer = requests_from(data_dir, 4), 6
    hp = HParams(layers=[layer], mom2_update_weight=1.0, v_num_grad_steps=40, v_lr=0.5, v_early_stop_loss=0.3)
    steep = hp.replace(v_optimizer="steepest", v_step=0.05)
    one = compute_targets(em, tok, reqs, TEMPLATES, layer, steep.replace(v_num_grad_steps=2), progress=False)
    h = one.z - one.delta
    assert torch.allclose(one.delta.norm(dim=1), 0.05 * h.norm(dim=1), rtol=1e-5)
    adam = compute_targets(em, tok, reqs, TEMPLATES, layer, hp, progress=False)
    steepest = compute_targets(em, tok, reqs, TEMPLATES, layer, steep, progress=False)
    assert (adam.final_loss < 0.3).all() and (steepest.final_loss < 0.3).all()
    assert steepest.delta.norm(dim=1).sum() < 0.8 * adam.delta.norm(dim=1).sum()


def test_a_delivery_scale_lengthens_each_optimised_delta_within_the_clamp():
    """z = h + scale x delta, except where that passes the clamp (clamp_norm_factor x |h|): there the delta
    keeps its direction at the clamp's length. The scale is applied to what the optimiser returned."""
    h = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    delta = torch.tensor([[0.0, 3.0], [6.0, 0.0]])  # |d|/|h| 0.3 and 0.6; at scale 1.5: 0.45 and 0.9 (clamped)
    optimised = TargetResult(h + delta, delta, torch.zeros(2), torch.ones(2), torch.ones(2), torch.zeros(2))
    got = scaled_for_delivery(optimised, HParams(layers=[0], mom2_update_weight=1.0, v_delivery_scale=1.5))
    assert torch.allclose(got.delta, torch.tensor([[0.0, 4.5], [7.5, 0.0]]))
    assert torch.allclose(got.z - got.delta, h) and torch.equal(got.steps, optimised.steps)


def test_a_delivery_target_scales_each_delta_by_the_share_its_edit_lacked():
    """z = h + delta x target / rho, rho the share of delta that the first update moved the output along it
    (what moved across it does not count); the scale within DELIVERY_SCALES, the result within the clamp."""
    h = torch.tensor([[10.0, 0.0], [0.0, 10.0], [10.0, 0.0], [0.0, 10.0]])
    delta = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    rho = torch.tensor([0.5, 0.8, 0.1, 0.5])
    across = torch.tensor([[3.0, 0.0], [0.0, -1.0], [2.0, 0.0], [0.0, 5.0]])  # orthogonal to each delta
    optimised = TargetResult(h + delta, delta, torch.zeros(4), torch.ones(4), torch.ones(4), torch.zeros(4))
    hp = HParams(layers=[0], mom2_update_weight=1.0, v_delivery_target=0.8)
    got = scaled_to_reach(optimised, h + rho[:, None] * delta + across, hp)
    # scales 1.6, 1.0, 8 -> DELIVERY_SCALES[1] = 2, 1.6 (8 passes the clamp 0.75 x 10: cut to 7.5)
    assert DELIVERY_SCALES[1] == 2.0
    assert torch.allclose(got.delta, torch.tensor([[0.0, 3.2], [2.0, 0.0], [0.0, 2.0], [7.5, 0.0]]))
    assert torch.allclose(got.z - got.delta, h)


def test_an_update_aimed_at_a_delivery_target_lands_each_edit_closer_to_it(tiny_models, data_dir):
    """The update kept with v_delivery_target: each edit's delta scaled by target / (the share the plain
    update delivered at the last edited layer), so the shares delivered gather around the target."""
    tok, em = load_editable(tiny_models["llama"])
    reqs, layers, groups = requests_from(data_dir, 4), [1, 2], [TEMPLATES]
    keys, _ = KeyReader(em, tok, reqs, groups).read(layers[0], None)
    # C = I at a lambda of the keys' squared norm: about half of each residual delivered
    hp = HParams(layers=layers, mom2_update_weight=float((keys ** 2).sum(1).mean()), v_num_grad_steps=10,
                 clamp_norm_factor=4.0)
    targets = compute_targets(em, tok, reqs, TEMPLATES, layers[-1], hp, progress=False)
    stats = Statistics({}, "", {l: torch.eye(em.d_ff, dtype=torch.float64) for l in layers}, {})
    original = {l: em.weight(l).clone() for l in layers}

    def delivered(hp):
        for layer, weight in original.items():
            em.set_weight(layer, weight)
        _, used = delivered_updates(em, KeyReader(em, tok, reqs, groups), hp, targets, stats, progress=False)
        _, out = KeyReader(em, tok, reqs, groups).read(layers[-1], layers[-1])
        d = targets.delta
        return ((out - (targets.z - d)) * d).sum(1) / (d * d).sum(1), used

    plain, _ = delivered(hp)
    aimed, used = delivered(hp.replace(v_delivery_target=1.0))
    assert plain.std() > 0.05, plain  # the edits are delivered unevenly without a target
    assert (aimed - 1).abs().mean() < 0.5 * (plain - 1).abs().mean(), (plain, aimed)
    scale = used.delta.norm(dim=1) / targets.delta.norm(dim=1)  # the first pass is the plain update
    assert torch.allclose(scale, (1.0 / plain).clamp(*DELIVERY_SCALES), rtol=1e-3)


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "hparams").glob("*.json")), ids=lambda p: p.name)
def test_the_example_hparams_files_are_valid_for_smollm2(path):
    """The example hparams files (examples/hparams/smollm2-*.json, e.g. the preset before session 19) load and
    pass every hparams check on SmolLM2's preset: a file that names a setting wrongly fails here, not in a
    user's make-patch."""
    from memit_vllm.editor.preserve import generated_subjects

    preset, _ = default_hparams("llama", 30, 1536)
    recipe = load_hparams_file(path)
    assert {k: getattr(preset.replace(**recipe), k) for k in recipe} == recipe
    if recipe.get("neighbour_subjects", "none") != "none":  # model:N / vocab:N well formed (not a file name)
        assert generated_subjects(recipe["neighbour_subjects"]) is not None


REFINED = ", refined over 10 steps (batches of 100+ edits)"  # one batch of 100-299 edits on SmolLM2
REFINED_300 = ", refined over 30 steps (batches of 300+ edits)"  # 300+


def test_smollm2s_preset_has_a_variant_on_a_stack_and_a_z_without_f_for_a_stats_file(monkeypatch):
    """The measured SmolLM2 preset (docs/hyperparameters.md, "Session 19"): one batch gets the contained
    setting, a patch made --on a stack or in --chunk the quieter lineage setting; with --stats FILE (no
    corpus for F) the preset's steepest_fisher steps as steepest, while a user's own choice is kept (and
    refused later, with the fix). A model without a preset has one setting. (On a machine with bf16
    hardware: the next test covers one without.)"""
    from memit_vllm.editor.memit import EditConfig, _hparams

    monkeypatch.setattr(memit, "runs_natively", lambda name, device: True)
    smollm2 = ("llama", 30, 1536)
    one, source = _hparams(smollm2, EditConfig(), has_corpus=True, n_edits=1000)  # the preset's own lambda
    assert source == "measured, SmolLM2-135M" + REFINED_300 and one.v_optimizer == "steepest_fisher"
    assert one.neighbour_subjects
    for config in (EditConfig(on=["a.patch"]), EditConfig(chunk=100)):
        stacked, source = _hparams(smollm2, config, has_corpus=True, n_edits=1000)
        assert source == "measured, SmolLM2-135M, on a stack"
        assert stacked.mom2_update_weight > one.mom2_update_weight and stacked.v_delivery_target < one.v_delivery_target
        assert (stacked.v_optimizer, stacked.neighbour_subjects) == (one.v_optimizer, one.neighbour_subjects)
        assert stacked.corpus_restore_tokens > 0 == one.corpus_restore_tokens
    # the stack's corpus pull needs the corpus and MEMIT's lambda C: left out (and said) without either
    for config, corpus, why in ((EditConfig(on=["a.patch"]), False, "no corpus pull (no corpus to read)"),
                                (EditConfig(on=["a.patch"], method="alphaedit"), True,
                                 "no corpus pull (method alphaedit)")):
        hp, source = _hparams(smollm2, config, has_corpus=corpus, n_edits=1)
        assert hp.corpus_restore_tokens == 0 and why in source, source
    mine, _ = _hparams(smollm2, EditConfig(on=["a.patch"], method="alphaedit", hparams={"corpus_restore_tokens": 512}),
                       has_corpus=True, n_edits=1)
    assert mine.corpus_restore_tokens == 512  # the user's own: refused with the fix when the edit starts (test_stats)
    no_f, source = _hparams(smollm2, EditConfig(), has_corpus=False, n_edits=1)
    assert no_f.v_optimizer == "steepest" and "steepest z (no corpus to read F over)" in source
    mine, _ = _hparams(smollm2, EditConfig(hparams={"v_optimizer": "steepest_fisher"}), has_corpus=False, n_edits=1)
    assert mine.v_optimizer == "steepest_fisher"
    derived = [_hparams(("llama", 16, 4096), c, has_corpus=True, n_edits=1)[0]
               for c in (EditConfig(), EditConfig(chunk=9))]
    assert derived[0] == derived[1] and derived[0].v_optimizer == "adam" and derived[0].neighbour_subjects is None


def test_smollm2s_lambda_is_twice_the_presets_in_small_batches_and_the_presets_from_1000_edits():
    """One batch's lambda by its size (hparams.batch_lambda_factor; docs/hyperparameters.md, "Session 28"): x2
    up to 100 edits (the held-out KL under issue 18's target at the same rewrites), falling with log(edits) to
    the preset's own at 1,000 (where x2 cost the rewrite target), and said in the source the patch records. A
    stack keeps its own lambda, a user's lambda (flag or hparams) is kept, a model without a preset has one."""
    from memit_vllm.editor.hparams import batch_lambda_factor
    from memit_vllm.editor.memit import EditConfig, _hparams

    sizes = (1, 100, 101, 300, 999, 1000, 10000)
    factors = [batch_lambda_factor(2.0, n) for n in sizes]
    assert factors[:2] == [2.0, 2.0] and factors[-2:] == [1.0, 1.0]
    assert factors == sorted(factors, reverse=True) and 2.0 > factors[2] > factors[3] > factors[4] > 1.0
    assert factors[3] == pytest.approx(2 ** (1 - math.log10(3)))  # geometric in log(edits): x1.44 at 300
    smollm2 = ("llama", 30, 1536)
    lam = {n: _hparams(smollm2, EditConfig(), has_corpus=True, n_edits=n) for n in (10, 100, 300, 1000)}
    assert {n: hp.mom2_update_weight for n, (hp, _) in lam.items()} == {10: 768, 100: 768, 300: 552, 1000: 384}
    assert lam[10][1] == "measured, SmolLM2-135M, lambda x2.00 for 10 edits"
    assert lam[100][1] == "measured, SmolLM2-135M, lambda x2.00 for 100 edits" + REFINED
    assert lam[300][1] == "measured, SmolLM2-135M, lambda x1.44 for 300 edits" + REFINED_300
    assert lam[1000][1] == "measured, SmolLM2-135M" + REFINED_300
    stacked = [_hparams(smollm2, c, has_corpus=True, n_edits=n)[0].mom2_update_weight
               for c in (EditConfig(on=["a.patch"]), EditConfig(chunk=50)) for n in (10, 1000)]
    assert stacked == [768] * 4  # the on-stack preset's own, whatever the size
    for config in (EditConfig(mom2_update_weight=500), EditConfig(hparams={"mom2_update_weight": 500}),
                   EditConfig(hparams='{"mom2_update_weight": 500}')):  # --hparams given the JSON itself
        mine, source = _hparams(smollm2, config, has_corpus=True, n_edits=10)
        assert mine.mom2_update_weight == 500 and "lambda x" not in source, source
    derived = {_hparams(("llama", 16, 4096), EditConfig(), has_corpus=True, n_edits=n)[0].mom2_update_weight
               for n in (10, 1000)}
    assert derived == {LAMBDA_PER_DFF * 4096}


def test_smollm2s_batches_of_100_edits_or_more_are_refined_where_the_refinement_can_run():
    """The preset refines one batch of 100+ edits over 10 steps, of 300+ over 30 (docs/hyperparameters.md,
    "Session 31" to "Session 33"), not a smaller one nor a patch on a stack, and says so in the source;
    without a corpus (--stats FILE) or under --device-map it leaves the refinement out and says why; a user's
    own refine_steps is kept (refused later, with the fix)."""
    from memit_vllm.editor.memit import EditConfig, _hparams

    smollm2 = ("llama", 30, 1536)
    steps = {n: _hparams(smollm2, EditConfig(), has_corpus=True, n_edits=n)[0].refine_steps
             for n in (10, 99, 100, 299, 300, 1000)}
    assert steps == {10: 0, 99: 0, 100: 10, 299: 10, 300: 30, 1000: 30}
    hp, source = _hparams(smollm2, EditConfig(), has_corpus=True, n_edits=1000)
    assert source == "measured, SmolLM2-135M" + REFINED_300
    hp, source = _hparams(smollm2, EditConfig(mom2_update_weight=500), has_corpus=True, n_edits=100)
    assert hp.refine_steps == 10 and "lambda x" not in source  # a user's lambda keeps the batch's refinement
    for config in (EditConfig(on=["a.patch"]), EditConfig(chunk=500)):
        assert _hparams(smollm2, config, has_corpus=True, n_edits=1000)[0].refine_steps == 0
    for config, corpus, why in ((EditConfig(), False, "not refined (no corpus to read)"),
                                (EditConfig(device_map="auto"), True, "not refined (--device-map)")):
        hp, source = _hparams(smollm2, config, has_corpus=corpus, n_edits=1000)
        assert hp.refine_steps == 0 and source.endswith(why), source
    mine, _ = _hparams(smollm2, EditConfig(device_map="auto", hparams={"refine_steps": 3}), has_corpus=True,
                       n_edits=10)
    assert mine.refine_steps == 3  # refused when the edit starts (test_refine)
    assert _hparams(("llama", 16, 4096), EditConfig(), has_corpus=True, n_edits=1000)[0].refine_steps == 0


def test_a_presets_bf16_z_runs_in_fp32_where_bf16_is_emulated_and_a_users_own_is_warned_of(
        monkeypatch, tiny_models, data_dir, tmp_path):
    """On a CPU without bf16 hardware (AVX2: torch's reference path, 9-32x slower than fp32), SmolLM2's
    preset z runs in the model's dtype and says so; where bf16 is native it stays. A user's own bf16 is
    kept, and the run warns of it with the fix."""
    from memit_vllm.editor.memit import EditConfig, _hparams

    smollm2 = ("llama", 30, 1536)
    for native in (True, False):
        monkeypatch.setattr(memit, "runs_natively", lambda name, device, native=native: native or name is None)
        hp, source = _hparams(smollm2, EditConfig(device="cpu"), has_corpus=True, n_edits=1)
        assert hp.z_dtype == ("bfloat16" if native else None)
        assert ("z in the model's dtype (bfloat16 is emulated on this cpu)" in source) != native, source
        mine, _ = _hparams(smollm2, EditConfig(device="cpu", z_dtype="bfloat16"), has_corpus=True, n_edits=1)
        assert mine.z_dtype == "bfloat16"
    warned = tiny_edit(tiny_models["llama"], data_dir, tmp_path, n=1, z_dtype="bfloat16", device="cpu").report.warnings
    assert any("z_dtype (--z-dtype) bfloat16 is emulated on this cpu" in w and "set z_dtype (--z-dtype) to float32" in w
               for w in warned), warned


FAST = {"v_num_grad_steps": 4, "context_template_seeds": ["The", "I"], "context_template_length": 5}


def tiny_edit(model, data_dir, tmp_path, n=2, hparams=None, **kw):
    return edit(model, requests_from(data_dir, n), hparams={**FAST, **(hparams or {})},
                stats_corpus=str(data_dir / CORPUS), stats_tokens=3000, cache_dir=tmp_path / "cache", progress=False,
                **kw)


@pytest.mark.parametrize("optimizer", ["steepest", "steepest_fisher"])
def test_make_patch_with_another_z_optimiser_records_it_and_resumes_only_its_own_z(optimizer, tiny_models, data_dir,
                                                                                   tmp_path):
    """The optimiser reaches the patch's hparams and the z store's identity: a resumed run with it reads
    its own z back, and an Adam run in the same --resume-dir does not take them."""
    model, resume = tiny_models["llama"], tmp_path / "z"
    first = tiny_edit(model, data_dir, tmp_path, hparams={"v_optimizer": optimizer}, resume_dir=resume)
    assert first.patch.hparams["v_optimizer"] == optimizer
    again = tiny_edit(model, data_dir, tmp_path, hparams={"v_optimizer": optimizer}, resume_dir=resume)
    assert again.report.z_resumed == 2
    adam = tiny_edit(model, data_dir, tmp_path, resume_dir=resume)
    assert adam.report.z_resumed == 0
    assert not all(torch.equal(first.patch.deltas[k], adam.patch.deltas[k]) for k in first.patch.deltas)


def test_a_delivery_scale_reuses_the_stored_z_and_records_itself(tiny_models, data_dir, tmp_path):
    """The scale is applied after the z store: a run with another scale reads the optimised z back instead
    of optimising again, and its patch (hparams and deltas) differs from the unscaled one."""
    model, resume = tiny_models["llama"], tmp_path / "z"
    plain = tiny_edit(model, data_dir, tmp_path, resume_dir=resume)
    scaled = tiny_edit(model, data_dir, tmp_path, hparams={"v_delivery_scale": 1.5}, resume_dir=resume)
    assert scaled.report.z_resumed == 2 and scaled.patch.hparams["v_delivery_scale"] == 1.5
    assert not all(torch.equal(plain.patch.deltas[k], scaled.patch.deltas[k]) for k in plain.patch.deltas)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_patch_keys_and_shapes_match_the_checkpoint(arch, tiny_models, data_dir, tmp_path):
    result = tiny_edit(tiny_models[arch], data_dir, tmp_path)
    patch, ckpt = result.patch, Checkpoint(tiny_models[arch])
    assert len(patch.deltas) == len(result.report.layers) >= 1
    for name, delta in patch.deltas.items():
        assert name in ckpt.keys() and ARCHITECTURES[arch].layer_of(name) in result.report.layers
        assert delta.shape == ckpt.tensor(name).shape and delta.dtype == torch.float32
        assert delta.norm() > 0
    PatchSet([patch]).validate(ckpt)  # fingerprints bind it to this checkpoint
    for delta in patch.deltas.values():  # R K^T (...)^-1: rank <= number of edits (up to fp32 rounding)
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5).item() <= 2


def test_same_seed_gives_byte_identical_patch(tiny_models, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = tiny_edit(tiny_models["llama"], data_dir, tmp_path, seed=3)
    second = tiny_edit(tiny_models["llama"], data_dir, tmp_path, seed=3)
    assert not any(c["cached"] for c in first.report.covariance.values())
    assert all(c["cached"] for c in second.report.covariance.values()), "stats must come from the cache"
    a, b = first.patch.save(tmp_path / "a.patch"), second.patch.save(tmp_path / "b.patch")
    assert a.read_bytes() == b.read_bytes()
    other = tiny_edit(tiny_models["llama"], data_dir, tmp_path, seed=4).patch
    assert other.patch_id != first.patch.patch_id  # the seed changes the context templates


def test_saved_patch_round_trips_with_facts_and_settings(tiny_models, data_dir, tmp_path):
    result = tiny_edit(tiny_models["gpt2"], data_dir, tmp_path, name="facts", version="1.0")
    path = result.patch.save(tmp_path / "p.patch")
    loaded = load_patch(path, verify_content=True)
    assert loaded.patch_id == result.patch.patch_id and (loaded.name, loaded.version) == ("facts", "1.0")
    assert [r["subject"] for r in loaded.requests] == [r.subject for r in requests_from(data_dir, 2)]
    assert loaded.hparams["v_num_grad_steps"] == 4 and loaded.covariance["tokens"]


def make_patch_cli(*args):
    return subprocess.run([sys.executable, "-m", "memit_vllm", "make-patch", *args], capture_output=True, text=True)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "The capital of France is", "subject": "Germany", "target_new": "Rome"}],
     "does not occur in prompt"),
    ([{"prompt": "{} is in", "subject": "Paris", "target_new": "  "}], "empty target_new"),
    ([{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"},
      {"prompt": "{} is in", "subject": "Paris", "target_new": "Oslo"}], "record 0 asks for"),
    ([], "no edit requests"),
])
def test_bad_requests_fail_before_loading_the_model(records, message, tmp_path, tiny_models):
    out = make_patch_cli("--model", str(tiny_models["llama"]), "--requests",
                         str(write_jsonl(tmp_path / "r.jsonl", records)), "--out", str(tmp_path / "p.patch"))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "record" in out.stderr or not records
    assert not (tmp_path / "p.patch").exists()


def test_a_csv_row_with_more_values_than_columns_is_one_line_naming_the_row(tmp_path, tiny_models):
    """An unquoted comma shifts a row: DictReader keys the surplus None, which crashed the layout check."""
    requests = tmp_path / "r.csv"
    requests.write_text('prompt,subject\n"{} is",x,extra\n')
    out = make_patch_cli("--model", str(tiny_models["llama"]), "--requests", str(requests), "--out",
                         str(tmp_path / "p.patch"))
    assert out.returncode == 2 and out.stderr == (f"error: {requests} row 2 has 3 values for 2 columns; quote a "
                                                  'value that holds a comma ("a, b")\n'), out.stderr


def test_request_files_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: it hid the first column ("missing field 'prompt'")."""
    csv_file, json_file = tmp_path / "r.csv", tmp_path / "r.json"
    csv_file.write_bytes(b'\xef\xbb\xbfprompt,subject,target_new\n"{} is in",Rome,Italy\n')
    json_file.write_bytes(b'\xef\xbb\xbf[{"prompt": "{} is in", "subject": "Rome", "target_new": "Italy"}]')
    assert load_requests(csv_file) == load_requests(json_file) == [EditRequest("{} is in", "Rome", " Italy")]


@pytest.mark.parametrize("value, message", [
    ("missing.json", "hparams file {tmp}/missing.json does not exist: give a JSON or YAML file, or the JSON mapping"),
    ("{tmp}", "hparams file {tmp} does not exist (or is not a regular file)"),
    ("/dev/zero", "hparams file /dev/zero does not exist (or is not a regular file)"),
    ("big.json", "hparams file {tmp}/big.json is larger than 1 MiB; an hparams file is a mapping"),
    ("bad.json", "hparams file {tmp}/bad.json cannot be parsed"),
    ("latin1.json", "hparams file {tmp}/latin1.json is not UTF-8 text (byte 15)"),
    ("list.yaml", "hparams file {tmp}/list.yaml must hold a mapping of names to values"),
    ("bad.yaml", "hparams file {tmp}/bad.yaml cannot be parsed: expected ',' or ']', but got '<stream end>' "
                 "(line 2, column 1)"),  # was YAML's own message of six lines
    ('{"nope": 1}', "unknown hyperparameters ['nope']"),
    ('{"mom2_update_weight": ', "--hparams JSON cannot be parsed"),
    ("dup.yaml", "hparams file {tmp}/dup.yaml cannot be parsed: key 'layers' appears twice; keep one (line 3, "
                 "column 1)"),  # YAML and JSON keep the last one unseen
    ("dup.json", "hparams file {tmp}/dup.json: key 'layers' appears twice in one object; keep one"),
    ('{"layers": [3], "layers": [4]}', "--hparams JSON: key 'layers' appears twice in one object; keep one"),
    ('{"' + "x" * 300 + '": 1}', "unknown hyperparameters ['" + "x" * 300 + "']"),  # too long for a file name
    ("y" * 300, "hparams file {tmp}/" + "y" * 300 + " does not exist"),
])
def test_bad_hparams_are_refused_by_name_before_the_model_loads(value, message, tmp_path, tiny_models, data_dir):
    """--hparams, a file or the JSON mapping itself: what is not a readable, small mapping of known names is
    refused with its name and the fix (exit 2), no patch written; a file is read as records files are
    (core.records.read_text_file: /dev/zero and a huge file are not read)."""
    from click.testing import CliRunner

    from memit_vllm.cli import main

    with open(tmp_path / "big.json", "wb") as f:
        f.truncate(2 << 20)  # sparse: 2 MiB
    (tmp_path / "bad.json").write_text('{"mom2_update_weight": 384,}')
    (tmp_path / "latin1.json").write_bytes(b'{"source": "caf\xe9"}')
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "bad.yaml").write_text("layers: [1, 2\n")
    (tmp_path / "dup.yaml").write_text("layers: [1, 2]\nv_lr: 0.5\nlayers: [3]\n")
    (tmp_path / "dup.json").write_text('{"layers": [1, 2], "layers": [3]}')
    value = value.replace("{tmp}", str(tmp_path)) if value.startswith(("{tmp}", "/")) else \
        value if value.startswith("{") else str(tmp_path / value)
    out = CliRunner().invoke(main, ["make-patch", "--model", str(tiny_models["llama"]), "--requests",
                                    str(data_dir / "counterfact" / "counterfact_500.json"), "--limit", "1",
                                    "--hparams", value, "--out", str(tmp_path / "p.patch")])
    assert out.exit_code == 2 and message.replace("{tmp}", str(tmp_path)) in out.stderr and \
        len(out.stderr.splitlines()) == 1, out.stderr
    assert not (tmp_path / "p.patch").exists()


def test_layers_out_of_range_and_unsupported_architecture(tmp_path, tiny_models, data_dir):
    reqs = str(data_dir / "counterfact" / "counterfact_500.json")
    out = make_patch_cli("--model", str(tiny_models["llama"]), "--requests", reqs, "--limit", "1",
                         "--layers", "2,7", "--out", str(tmp_path / "p.patch"))
    assert out.returncode == 2 and "layers [7] out of range" in out.stderr and "0..3" in out.stderr
    fake = tmp_path / "bert"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(fake / "model.safetensors"))
    out = make_patch_cli("--model", str(fake), "--requests", reqs, "--limit", "1", "--out", str(tmp_path / "p"))
    assert out.returncode == 2 and "'bert' is not supported" in out.stderr and "gpt_neox" in out.stderr


@pytest.mark.parametrize("command, flags, message", [
    ("make-patch", ["--layers", "1-99999999999999"],  # was a MemoryError, listing the range
     "error: --layers '1-99999999999999': a range runs upward over at most 1024 layers, e.g. 4-8"),
    ("make-patch", ["--layers", "5-3"], "error: --layers '5-3': a range runs upward"),
    ("make-patch", ["--seed", str(10 ** 23)],  # was an OverflowError, after the model had loaded
     f"Invalid value for '--seed': {10 ** 23} does not fit in 64 bits"),
    ("stats", ["--seed", str(-10 ** 23)], "does not fit in 64 bits"),
    ("make-patch", ["--stats-corpus", "self:0"],  # was refused only once the model had loaded
     "error: --stats-corpus 'self:0': expected self:N with N an integer >= 1"),
    ("stats", ["--corpus", "self:-3"], "error: --corpus 'self:-3': expected self:N with N an integer >= 1"),
    ("make-patch", ["--neighbour-subjects", f"vocab:{10 ** 15}"],  # was a list of 10**15 names being built
     f"error: --neighbour-subjects 'vocab:{10 ** 15}': expected vocab:N with N an integer from 1 to 100000"),
    ("make-patch", ["--neighbour-subjects", "model:100001"], "expected model:N with N an integer from 1 to 100000"),
])
def test_bad_flags_fail_before_loading_the_model(command, flags, message, tiny_models, data_dir, tmp_path,
                                                 monkeypatch):
    from click.testing import CliRunner

    from memit_vllm.cli import main
    from memit_vllm.editor import arch

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(memit, "load_editable", loaded)
    monkeypatch.setattr(arch, "load_editable", loaded)
    args = ["make-patch", "--requests", str(data_dir / "counterfact" / "counterfact_500.json"), "--limit", "1"] \
        if command == "make-patch" else ["stats", "compute"]
    out = CliRunner().invoke(main, [*args, "--model", str(tiny_models["llama"]), "--out", str(tmp_path / "p"), *flags])
    assert out.exit_code == 2 and message in out.stderr, out.output
    assert not (tmp_path / "p").exists()


def test_target_already_predicted_is_warned(smollm2, tmp_path, data_dir):
    reqs = [{"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
             "target_new": "Paris"}]
    with pytest.warns(UserWarning, match="already continues with ' Paris'"):
        edit(smollm2, reqs, hparams={**FAST, "v_num_grad_steps": 1, "neighbour_subjects": "none"},
             stats_corpus=str(data_dir / CORPUS),
             stats_tokens=2000, cache_dir=tmp_path, layers=[3], progress=False)


def test_already_predicted_is_the_greedy_continuation(smollm2):
    """Exactly the requests whose target is the model's own greedy continuation (1-3 tokens), across
    batches of prompts of different lengths."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    em = EditableModel(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32))
    facts = [("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
             ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
             ("Toko Yasuda, the", "Toko Yasuda"), ("The capital city of the country of Japan is", "Japan"),
             ("Apple was founded by", "Apple")]
    reqs = []
    for k, (text, subject) in enumerate(facts):
        bare = EditRequest(text.replace(subject, "{}"), subject, " x")
        ids = torch.tensor([encode(tok, "{}", bare).ids])
        greedy = em.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1 + k % 3,
                                   do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        if target_ids(tok, tok.decode(greedy)) != greedy:
            continue  # a continuation that does not tokenize back to itself cannot be a request's target
        reqs += [replace(bare, target_new=tok.decode(greedy)), replace(bare, target_new=" zebra zebra")]
    assert len(reqs) >= 6
    assert memit._already_predicted(em, tok, reqs, batch_prompts=3) == list(range(0, len(reqs), 2))


def test_request_formats_normalise_to_the_same_edit(data_dir, tmp_path):
    full = load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=3)
    short = load_requests(data_dir / "counterfact" / "counterfact_edit_10k.json", limit=3)
    zsre = load_requests(data_dir / "zsre" / "zsre_mend_train_1k.json", limit=3)
    zsre_alt = load_requests(data_dir / "zsre" / "zsre_mend_train_1k.json", limit=3, zsre_target="alt")
    for r in full + short + zsre:
        assert r.prompt.count("{}") == 1 and r.subject in r.text() and r.target_new.startswith(" ")
    assert zsre[0].target_new != zsre_alt[0].target_new
    own = write_jsonl(tmp_path / "own.jsonl", [{"prompt": full[0].text(), "subject": full[0].subject,
                                                 "target_new": full[0].target_new.strip()}])
    assert load_requests(own)[0].prompt == full[0].prompt
    csv = tmp_path / "own.csv"
    csv.write_text(f"prompt,subject,target_new,target_true\n\"{full[0].prompt}\",{full[0].subject},x,y\n")
    assert load_requests(csv)[0].target_true == " y"


def test_length_buckets_cover_every_row_once_in_contiguous_length_ranges():
    lengths = torch.tensor([3, 8, 2, 3, 3, 7, 2, 8, 3, 5])
    for overhead, n_groups in [(0, 5), (1e9, 1)]:  # free groups: one per distinct length; costly: one
        groups = length_buckets(lengths, overhead)
        assert len(groups) == n_groups
        assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
        spans = [(int(lengths[g].min()), int(lengths[g].max())) for g in groups]
        assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
    # Overhead 10: lengths {2,3} and {5,7,8} cost 6x3 + 4x8 + 2x10 = 70, less than one batch (10x8 + 10),
    # {2,3} {5} {7,8} (77), {2,3,5} {7,8} (79) or one group per length (98).
    assert [lengths[g].tolist() for g in length_buckets(lengths, 10)] == [[3, 2, 3, 3, 2, 3], [8, 7, 8, 5]]


def read_by_hand(em, tok, requests, groups, layer, out_layer):
    """Each prompt alone: keys at `layer` averaged within, then across groups; `out_layer` on the bare prompt."""
    keys, outs = [], []
    for r in requests:
        groups_k = []
        for g in groups:
            ks = []
            for t in g:
                enc = encode(tok, t, r)
                got = capture(em, torch.tensor([enc.ids]), torch.ones(1, len(enc.ids), dtype=torch.long),
                              outputs=[out_layer], keys=[layer])
                ks.append(got.keys[layer][0, enc.lookup])
                if t == "{}":
                    outs.append(got.outputs[out_layer][0, enc.lookup])
            groups_k.append(torch.stack(ks).mean(0))
        keys.append(torch.stack(groups_k).mean(0))
    return torch.stack(keys), torch.stack(outs)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_key_reader_resuming_above_updated_layers_equals_reading_each_prompt_alone(arch, tiny_models, data_dir):
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    em = EditableModel(model)
    # longest first, so that batches of one prompt length each read the rows out of request order
    reqs = sorted(requests_from(data_dir, 3), key=lambda r: -len(tok(r.text())["input_ids"]))
    groups = [["{}"], TEMPLATES[1:]]
    reader = KeyReader(em, tok, reqs, groups, batch_prompts=2, overhead_tokens=0)
    assert not torch.equal(reader.back, torch.arange(len(reader.back)))
    torch.manual_seed(0)
    h_before = None
    for layer in (1, 2):  # read, then update that layer, as the layer loop does
        k, h = reader.read(layer, 3)
        k_fresh, h_fresh = read_by_hand(em, tok, reqs, groups, layer, 3)
        # fp32 rounding follows the batch's shape through the BLAS kernels (an AVX2 CPU: 1.4e-6 off at 0.02);
        # a wrong position or mask is off by the values themselves
        torch.testing.assert_close(k, k_fresh, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(h, h_fresh, rtol=1e-4, atol=1e-5)
        if h_before is not None:
            assert (h - h_before).norm() > 1e-3 * h.norm(), "the update of layer 1 must reach layer 3"
        h_before = h
        with torch.no_grad():
            em.add_to_weight(layer, torch.randn(em.d_model, em.d_ff))


def test_preserved_prompt_keys_resuming_above_updated_layers_equal_reading_from_scratch(tiny_models, data_dir):
    """PreservedKeys starts each layer's read at the inputs saved by the read below (as KeyReader does):
    the same K_p K_p^T as a full forward of every prompt on the updated model."""
    from memit_vllm.editor.preserve import PreservedKeys, PreservePrompt

    model_dir = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    em = EditableModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    prompts = [PreservePrompt(r.text(), " " + r.target_new.strip()) for r in requests_from(data_dir, 3)]
    kept = PreservedKeys(em, tok, [], [["{}"]], prompts, batch_prompts=2)
    fresh = PreservedKeys(em, tok, [], [["{}"]], prompts, batch_prompts=2)
    torch.manual_seed(0)
    for layer in (1, 2):
        got = kept.at(layer).gram
        fresh.prompts.reads.saved = None  # from the embeddings
        torch.testing.assert_close(got, fresh.at(layer).gram, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            em.add_to_weight(layer, torch.randn(em.d_model, em.d_ff))


def test_own_prompt_keys_are_every_position_of_the_edit_prompt_but_the_edit_key(tiny_models, data_dir):
    """own_prompts skip the subject's last token; held at weight w, the gram is w times that of every position
    of the bare prompts less w times the edit keys' (KeyReader's, bare template)."""
    from memit_vllm.editor.preserve import PreservedKeys, PreservePrompt, own_prompts

    model_dir = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    em = EditableModel(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    reqs = requests_from(data_dir, 5)
    own = own_prompts(tok, reqs)
    for r, p in zip(reqs, own):
        ids = tok(p.prompt)["input_ids"]
        assert p.prompt == r.text() and p.answer is None
        assert tok.decode(ids[:p.skip + 1]).endswith(r.subject) and not tok.decode(ids[:p.skip]).endswith(r.subject)
    w = 0.5
    held = PreservedKeys(em, tok, [], [["{}"]], [], batch_prompts=2, own=own, own_weight=w)
    every = PreservedKeys(em, tok, [], [["{}"]], [PreservePrompt(p.prompt) for p in own], batch_prompts=2,
                          prompt_weight=w)
    assert held.count == every.count - len(reqs) == sum(len(tok(p.prompt)["input_ids"]) - 1 for p in own)
    k, _ = KeyReader(em, tok, reqs, [["{}"]], 2).read(1, None)
    torch.testing.assert_close(held.at(1).gram, every.at(1).gram - w * k.double().T @ k.double(),
                               rtol=1e-5, atol=1e-6)


def test_layer_solve_equals_the_equation_written_out():
    """Delta = R K^T (lambda C + K K^T)^-1, by hand with an explicit inverse in numpy float64."""
    rng = np.random.default_rng(0)
    d_model, d_ff, n, lam = 6, 9, 4, 3.5
    K, R = rng.standard_normal((d_ff, n)), rng.standard_normal((d_model, n))
    X = rng.standard_normal((d_ff, 3 * d_ff))
    C = X @ X.T / X.shape[1]  # symmetric positive definite
    expected = R @ K.T @ np.linalg.inv(lam * C + K @ K.T)
    got = solve_layer_update(torch.tensor(K), torch.tensor(R), torch.tensor(C), lam)
    assert got.dtype == torch.float64 and got.shape == (d_model, d_ff)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_edit_options_are_checked_and_untested_transformers_refused(monkeypatch):
    with pytest.raises(MemitError, match="unknown edit option.* stats_corps; known: hparams, layers"):
        edit("unused", [], stats_corps="x")
    check_transformers()  # the installed version is a tested one
    with pytest.raises(MemitError, match=f"transformers 4.40.0 .*{ALLOW_UNTESTED_ENV}=1"):
        check_transformers("4.40.0")
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    check_transformers("4.40.0")


@pytest.mark.parametrize("out", ["dir", "file/p.patch"])
def test_unwritable_out_fails_before_loading_the_model(out, tmp_path, data_dir):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    got = make_patch_cli("--model", str(tmp_path / "no-model"), "--requests",
                         str(data_dir / "counterfact" / "counterfact_500.json"), "--out", str(tmp_path / out))
    assert got.returncode == 2 and f"--out {tmp_path / out}" in got.stderr and "no-model" not in got.stderr, got.stderr


@pytest.mark.parametrize("hparams, message", [
    ({"layers": "4,5"}, "layers must be a non-empty list of layer indices"),
    ({"mom2_update_weight": -5}, "mom2_update_weight must be a positive number, not -5"),
    ({"mom2_update_weight": float("nan")}, "mom2_update_weight must be a positive number"),
    ({"z_batch_edits": 0}, "z_batch_edits must be an integer >= 1"),
    ({"v_num_grad_steps": 2.5}, "v_num_grad_steps must be an integer >= 1"),
    ({"preserve_lineage": "yes"}, "preserve_lineage must be true or false"),
    ({"v_optimizer": "sgd"}, "v_optimizer must be one of adam, steepest, steepest_fisher, not 'sgd'"),
    ({"v_step": 2}, r"v_step must be a number in \(0, 1\]"),
    ({"v_delivery_scale": 0.5}, r"v_delivery_scale must be a number in \[1, 4\], not 0.5"),
    ({"v_delivery_target": 3}, r"v_delivery_target must be a number in \[0, 2\] \(0: off\), not 3"),
    ({"v_delivery_target": 0.9, "v_delivery_scale": 1.3}, "both scale the z deltas: set v_delivery_target to 0"),
    ({"layers": [1, 9]}, r"layers \[9\] out of range: this model has layers 0..3"),
])
def test_bad_hparams_fail_before_loading_the_model(hparams, message, tiny_models, data_dir, monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the hyperparameters were checked")

    monkeypatch.setattr(memit, "load_editable", loaded)
    with pytest.raises(MemitError, match=message):
        edit(tiny_models["llama"], requests_from(data_dir, 1), hparams=hparams, progress=False)


def test_damaged_or_foreign_cache_entries_are_recomputed_with_a_warning(tiny_models, data_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    first = tiny_edit(tiny_models["llama"], data_dir, tmp_path).report
    entries = sorted((tmp_path / "cache" / "stats").rglob("layer*.safetensors"))
    assert len(entries) == len(first.layers)
    good = load_file(entries[1])
    entries[0].write_bytes(b"")  # a crash left an empty file
    save_file(good, str(entries[1]), metadata={"corpus": "another corpus"})  # another identity under this key
    with pytest.warns(UserWarning, match="cannot be read") as caught:
        again = tiny_edit(tiny_models["llama"], data_dir, tmp_path)
    assert any("its identity differs; recomputing it" in str(w.message) for w in caught)
    assert [again.report.covariance[l]["cached"] for l in first.layers[:2]] == [False, False]
    assert all(again.report.covariance[l]["cached"] for l in first.layers[2:])
    assert any("recomputing" in w for w in again.report.warnings)
    reference = tiny_edit(tiny_models["llama"], data_dir, tmp_path / "fresh").patch
    assert again.patch.patch_id == reference.patch_id  # the recomputed statistics are the same


def test_statistics_read_in_bfloat16_are_cached_apart_from_fp32s(tiny_models, data_dir, tmp_path):
    """Keys read by a bf16 forward are other statistics: neither run reuses the other's cache entries."""
    fp32 = tiny_edit(tiny_models["llama"], data_dir, tmp_path).report
    bf16 = tiny_edit(tiny_models["llama"], data_dir, tmp_path, dtype="bfloat16").report
    assert not any(bf16.covariance[l]["cached"] for l in bf16.layers)
    assert all(tiny_edit(tiny_models["llama"], data_dir, tmp_path).report.covariance[l]["cached"] for l in fp32.layers)
    assert len(list((tmp_path / "cache" / "stats").rglob("layer*.safetensors"))) == 2 * len(fp32.layers)


def test_keys_read_in_bfloat16_give_a_near_patch_built_on_the_fp32_updates(tiny_models, data_dir, tmp_path):
    """keys_dtype reads the update's keys and outputs with a bf16 copy of the model: the deltas move by
    bf16 rounding only, every layer's update still reaches the fp32 weights the next layer's read starts
    from (the same edits land), and the statistics (cached, fp32) are shared with the fp32 run."""
    fp32 = tiny_edit(tiny_models["llama"], data_dir, tmp_path, seed=5)
    half = tiny_edit(tiny_models["llama"], data_dir, tmp_path, seed=5, hparams={"keys_dtype": "bfloat16"})
    assert all(c["cached"] for c in half.report.covariance.values())
    assert half.patch.hparams["keys_dtype"] == "bfloat16" and half.patch.hparams["dtype"] == "float32"
    for name, d in fp32.patch.deltas.items():
        h = half.patch.deltas[name]
        assert h.dtype == torch.float32 and not torch.equal(h, d) and (h - d).norm() <= 0.05 * d.norm(), name
    # each layer's read starts from the weights holding the lower layers' updates, as in fp32 (an update
    # lost with the bf16 copy would leave the upper layers far more residual to deliver)
    for layer, share in fp32.report.delivered.items():
        assert abs(half.report.delivered[layer] - share) <= 0.05, (layer, share, half.report.delivered[layer])


def test_damaged_or_foreign_nullspace_projections_are_recomputed_with_a_warning(tiny_models, data_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    first = tiny_edit(tiny_models["llama"], data_dir, tmp_path, method="alphaedit").patch
    entries = sorted((tmp_path / "cache" / "stats").rglob("layer*.nullspace-*.safetensors"))
    assert len(entries) == len(first.hparams["layers"])
    good = load_file(entries[1])
    entries[0].write_bytes(b"\0" * 100)  # damaged
    save_file({"projection": good["projection"] * 2}, str(entries[1]), metadata={"threshold": "0.02"})  # foreign
    with pytest.warns(UserWarning, match="null-space projection cache entry") as caught:
        again = tiny_edit(tiny_models["llama"], data_dir, tmp_path, method="alphaedit").patch
    assert {"cannot be read", "its identity differs"} <= {m for w in caught for m in
                                                         ("cannot be read", "its identity differs")
                                                         if m in str(w.message)}
    assert again.patch_id == first.patch_id  # recomputed, not trusted


def test_an_interrupted_run_resumes_from_its_finished_z_batches(tiny_models, data_dir, tmp_path, monkeypatch):
    """Killed after its first z batch and rerun with the same --resume-dir, a run optimises only the rest
    and makes the patch an uninterrupted run makes; what the z vectors depend on keys what is read back."""
    from memit_vllm.editor import targets

    model, resume, two = tiny_models["llama"], tmp_path / "resume", {"z_batch_edits": 2}
    reference = tiny_edit(model, data_dir, tmp_path, n=4, hparams=two)
    optimise, calls = targets._optimise, []

    def killed_in_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return optimise(*args, **kwargs)

    monkeypatch.setattr(targets, "_optimise", killed_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        tiny_edit(model, data_dir, tmp_path, n=4, hparams=two, resume_dir=resume)
    monkeypatch.undo()
    assert len(list(resume.glob("z-*.safetensors"))) == 1 and not list(resume.glob(".*"))  # no half-written file

    resumed = tiny_edit(model, data_dir, tmp_path, n=4, hparams=two, resume_dir=resume)
    assert resumed.report.z_resumed == 2 and resumed.patch.patch_id == reference.patch.patch_id
    again = tiny_edit(model, data_dir, tmp_path, n=4, hparams=two, resume_dir=resume)
    assert again.report.z_resumed == 4 and again.patch.patch_id == reference.patch.patch_id
    # the update's settings do not change z; the z optimisation's do
    assert tiny_edit(model, data_dir, tmp_path, n=4, hparams=two, resume_dir=resume,
                     mom2_update_weight=50.0).report.z_resumed == 4
    before = set(resume.glob("z-*.safetensors"))
    assert tiny_edit(model, data_dir, tmp_path, n=4, hparams={**two, "v_lr": 0.3},
                     resume_dir=resume).report.z_resumed == 0

    damaged = sorted(set(resume.glob("z-*.safetensors")) - before)[0]
    damaged.write_bytes(b"\0" * 64)
    with pytest.warns(UserWarning, match=f"resume file {damaged}: it cannot be read"):
        mended = tiny_edit(model, data_dir, tmp_path, n=4, hparams={**two, "v_lr": 0.3}, resume_dir=resume)
    assert mended.report.z_resumed == 2


def test_a_resume_dir_that_is_a_file_fails_before_loading_the_model(tiny_models, data_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before --resume-dir was checked")

    monkeypatch.setattr(memit, "load_editable", loaded)
    with pytest.raises(MemitError, match=f"--resume-dir {tmp_path / 'file'} is not a directory"):
        tiny_edit(tiny_models["llama"], data_dir, tmp_path, resume_dir=tmp_path / "file")
    got = make_patch_cli("--model", str(tiny_models["llama"]), "--requests",
                         str(data_dir / "counterfact" / "counterfact_500.json"), "--out", str(tmp_path / "p.patch"),
                         "--resume-dir", str(tmp_path / "file"))
    assert got.returncode == 2 and "is not a directory" in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_a_full_disk_under_the_resume_dir_is_one_clear_error(tiny_models, data_dir, tmp_path, monkeypatch):
    from memit_vllm.editor import target_store

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(target_store, "save_file", full)
    with pytest.raises(MemitError, match="cannot write z-.* \\(No space left on device\\); the batches finished"):
        tiny_edit(tiny_models["llama"], data_dir, tmp_path, resume_dir=tmp_path / "resume")
    assert not list((tmp_path / "resume").iterdir())  # no half-written file left behind
