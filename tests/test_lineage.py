"""Editing over time (issue 13): patches made on a stack, changed and withdrawn facts, the AlphaEdit
update and preserved keys. Tiny models here; SmolLM2 served through vLLM in test_lineage_served.py."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.records import load_requests
from memit_vllm.editor import edit
from memit_vllm.editor.solve import nullspace_projection, solve_alphaedit_update, solve_layer_update
from memit_vllm.errors import MemitError
from memit_vllm.patch import LineageError, load_patch
from memit_vllm.patch.merge import PatchSet
from memit_vllm.patch.tools import stack_patches

CORPUS = "corpus/smollm2_self_2k.jsonl"
FAST = {"v_num_grad_steps": 4, "context_template_seeds": ["The", "I"], "context_template_length": 5}


def reqs(data_dir, start, n):
    return load_requests(data_dir / "counterfact" / "counterfact_500.json", limit=start + n)[start:]


def tiny_edit(model, requests, data_dir, tmp_path, **kw):
    return edit(model, requests, hparams={**FAST, **kw.pop("hparams", {})}, stats_corpus=str(data_dir / CORPUS),
                stats_tokens=3000, cache_dir=tmp_path / "cache", progress=False, **kw)


# -- the solves -------------------------------------------------------------------------------------------
def spd_with_null_space(rng, d, small):
    """A covariance whose eigenvalues are 1 except `small` of them at 1e-4."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    values = np.ones(d)
    values[:small] = 1e-4
    return (q * values) @ q.T, q[:, :small]


def test_alphaedit_solve_equals_the_equation_written_out():
    """Delta^T = (P (K_p K_p^T + K K^T) + L2 I)^-1 P K R^T, by hand in numpy float64."""
    rng = np.random.default_rng(0)
    d_model, d_ff, n, l2 = 5, 12, 3, 0.7
    C, _ = spd_with_null_space(rng, d_ff, 6)
    K, R, Kp = rng.standard_normal((d_ff, n)), rng.standard_normal((d_model, n)), rng.standard_normal((d_ff, 4))
    P = nullspace_projection(torch.tensor(C), 1e-2).numpy()
    expected = (np.linalg.inv(P @ (Kp @ Kp.T + K @ K.T) + l2 * np.eye(d_ff)) @ P @ K @ R.T).T
    got = solve_alphaedit_update(torch.tensor(K), torch.tensor(R), torch.tensor(P), torch.tensor(Kp @ Kp.T), l2)
    assert got.dtype == torch.float64 and got.shape == (d_model, d_ff)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_a_pull_on_preserved_keys_joins_both_solves_as_written_out():
    """With R_p K_p^T (preserve_restore): Delta = (R K^T + R_p K_p^T) (lambda C + K_p K_p^T + K K^T)^-1 for
    MEMIT, Delta^T = (P (K_p K_p^T + K K^T) + L2 I)^-1 P (K R^T + K_p R_p^T) for AlphaEdit, in numpy."""
    rng = np.random.default_rng(3)
    d_model, d_ff, n, lam, l2 = 5, 12, 3, 0.4, 0.7
    C, _ = spd_with_null_space(rng, d_ff, 6)
    K, R = rng.standard_normal((d_ff, n)), rng.standard_normal((d_model, n))
    Kp, Rp = rng.standard_normal((d_ff, 4)), rng.standard_normal((d_model, 4))
    P = nullspace_projection(torch.tensor(C), 1e-2).numpy()
    t = lambda a: torch.tensor(a)  # noqa: E731
    memit = (R @ K.T + Rp @ Kp.T) @ np.linalg.inv(lam * C + Kp @ Kp.T + K @ K.T)
    alpha = (np.linalg.inv(P @ (Kp @ Kp.T + K @ K.T) + l2 * np.eye(d_ff)) @ P @ (K @ R.T + Kp @ Rp.T)).T
    np.testing.assert_allclose(solve_layer_update(t(K), t(R), t(C), lam, t(Kp @ Kp.T), t(Rp @ Kp.T)).numpy(),
                               memit, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(solve_alphaedit_update(t(K), t(R), t(P), t(Kp @ Kp.T), l2, t(Rp @ Kp.T)).numpy(),
                               alpha, rtol=1e-9, atol=1e-12)


def test_projection_is_symmetric_idempotent_and_spans_the_small_eigenvalues():
    rng = np.random.default_rng(1)
    C, null = spd_with_null_space(rng, 10, 4)
    P = nullspace_projection(torch.tensor(C), 1e-2).numpy()
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    np.testing.assert_allclose(P @ P, P, atol=1e-12)
    assert round(np.trace(P)) == 4
    np.testing.assert_allclose(P @ null, null, atol=1e-10)  # the small directions pass, the rest do not
    assert np.linalg.norm(P @ (C @ rng.standard_normal(10))) < 1e-3


def test_preserved_keys_hardly_move_under_either_rule():
    """An update solved with K_p preserved changes the outputs at K_p far less than at the edited keys,
    and far less than the same update solved without them."""
    rng = np.random.default_rng(2)
    d_model, d_ff = 6, 40
    C, _ = spd_with_null_space(rng, d_ff, 30)
    K, R = rng.standard_normal((d_ff, 3)), rng.standard_normal((d_model, 3))
    Kp = rng.standard_normal((d_ff, 5))
    t = lambda a: torch.tensor(a)  # noqa: E731
    P = nullspace_projection(t(C), 1e-2)
    for solve in (lambda kept: solve_alphaedit_update(t(K), t(R), P, kept, 1e-3),
                  lambda kept: solve_layer_update(t(K), t(R), t(C), 1e-3, kept)):
        free, held = solve(None).numpy(), solve(t(1e4 * Kp @ Kp.T)).numpy()
        moved = np.linalg.norm(held @ Kp) / np.linalg.norm(held @ K)
        assert moved < 1e-2, moved
        assert np.linalg.norm(held @ Kp) < 0.05 * np.linalg.norm(free @ Kp)
        np.testing.assert_allclose(held @ K, R, rtol=0.05, atol=0.05)  # the edits still land


# -- lineage in the editor ----------------------------------------------------------------------------------
@pytest.fixture
def lineage(tiny_models, data_dir, tmp_path):
    model = tiny_models["llama"]
    a = tiny_edit(model, reqs(data_dir, 0, 2), data_dir, tmp_path, name="a").patch
    b = tiny_edit(model, reqs(data_dir, 2, 2), data_dir, tmp_path, name="b", on=[a]).patch
    return model, a, b


def test_a_patch_made_on_a_stack_records_it_and_binds_to_the_base(lineage, tmp_path):
    model, a, b = lineage
    assert b.made_on == [a.patch_id] and a.made_on == [] and b.format_version == 2 and a.format_version == 1
    ckpt = Checkpoint(model)
    assert b.base_weights == {n: ckpt.fingerprint(n) for n in b.deltas}  # still the base's
    path = b.save(tmp_path / "b.patch")
    assert load_patch(path, verify_content=True).made_on == [a.patch_id]
    PatchSet([a, b]).validate(ckpt)
    for stack in ([b], [b, a], [a, b, a]):
        with pytest.raises(LineageError):
            PatchSet(stack)
    with pytest.raises(LineageError, match=rf"{a.patch_id} is missing: give exactly, in this order: "
                                           rf"patch {a.patch_id}, patch b"):
        PatchSet([b])
    with pytest.raises(LineageError, match=r"patch b was made on .*, but is given after \['mp1-.*, 'mp1-.*'\]: "
                                           r"give exactly, in this order: patch a, patch b"):
        PatchSet([a, stack_patches([a]), b])
    one = stack_patches([a, b])  # a lineage stacks into one patch made on the bare base
    assert one.made_on == [] and one.parents == [a.patch_id, b.patch_id]


def test_the_child_is_solved_on_the_stack(lineage, data_dir, tmp_path):
    """Made on the stack, the child differs from the same edits made on the base."""
    model, a, b = lineage
    blind = tiny_edit(model, reqs(data_dir, 2, 2), data_dir, tmp_path, name="b").patch
    assert blind.made_on == []
    diff = max((blind.deltas[n] - b.deltas[n]).abs().max().item() for n in b.deltas)
    assert diff > 1e-4


def test_on_nothing_is_plain_make_patch_byte_for_byte(tiny_models, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model = tiny_models["llama"]
    plain = tiny_edit(model, reqs(data_dir, 0, 2), data_dir, tmp_path).patch.save(tmp_path / "plain.patch")
    on = tiny_edit(model, reqs(data_dir, 0, 2), data_dir, tmp_path, on=[]).patch.save(tmp_path / "on.patch")
    assert plain.read_bytes() == on.read_bytes()


def test_chunks_make_one_patch_equal_to_the_stacked_lineage(lineage, data_dir, tmp_path, monkeypatch):
    """chunk 2 on four requests: the fixture's lineage a -> b made in one call and stacked, with the same
    deltas as stacking a and b, every fact, made on the bare base, the chunk size recorded; with a resume dir
    a rerun reads every chunk's z back. A chunk as large as the requests is one batch (plain make-patch on a
    model without a preset); a bad chunk fails before the model loads, at the CLI too (exit 2)."""
    from memit_vllm.editor import memit

    model, a, b = lineage
    chunked = tiny_edit(model, reqs(data_dir, 0, 4), data_dir, tmp_path, chunk=2, name="ab", resume_dir=tmp_path / "z")
    by_hand = stack_patches([a, b])
    assert chunked.patch.deltas.keys() == by_hand.deltas.keys()
    assert all(torch.equal(chunked.patch.deltas[n], by_hand.deltas[n]) for n in by_hand.deltas)
    assert (chunked.patch.requests, chunked.patch.made_on, chunked.patch.name) == (by_hand.requests, [], "ab")
    assert chunked.patch.hparams["chunk"] == 2 and chunked.report.n_edits == 4 and chunked.report.preserved_keys > 0
    again = tiny_edit(model, reqs(data_dir, 0, 4), data_dir, tmp_path, chunk=2, name="ab", resume_dir=tmp_path / "z")
    assert (chunked.report.z_resumed, again.report.z_resumed) == (0, 4)  # every chunk's z read back
    assert again.patch.patch_id == chunked.patch.patch_id
    whole = tiny_edit(model, reqs(data_dir, 0, 4), data_dir, tmp_path, chunk=4).patch
    assert whole.patch_id == tiny_edit(model, reqs(data_dir, 0, 4), data_dir, tmp_path).patch.patch_id
    monkeypatch.setattr(memit, "load_editable", lambda *a, **k: pytest.fail("the model was loaded"))
    for bad in (0, "2", True):
        with pytest.raises(MemitError, match=f"chunk must be an integer >= 1 \\(edits per chunk\\), not {bad!r}"):
            tiny_edit(model, reqs(data_dir, 0, 4), data_dir, tmp_path, chunk=bad)
    cli = make_patch_cli("--model", model, "--requests", data_dir / "counterfact" / "counterfact_500.json",
                         "--limit", 4, "--chunk", 0, "--out", tmp_path / "never.patch")
    assert cli.returncode == 2 and "--chunk" in cli.stderr and not (tmp_path / "never.patch").exists()


def make_patch_cli(*args):
    return subprocess.run([sys.executable, "-m", "memit_vllm", "make-patch", *map(str, args)], capture_output=True,
                          text=True)


def test_change_and_withdraw_facts_from_the_command_line(lineage, data_dir, tmp_path):
    model, a, b = lineage
    pa, pb = a.save(tmp_path / "a.patch"), b.save(tmp_path / "b.patch")
    fact = load_patch(pa).requests[0]
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    common = ["--model", model, "--hparams", hp, "--stats-corpus", data_dir / CORPUS, "--stats-tokens", 3000,
              "--cache-dir", tmp_path / "cache", "--json"]
    change = tmp_path / "change.json"
    change.write_text(json.dumps([{**fact, "target_new": " Mars"}]))
    out = make_patch_cli("--requests", change, "--on", pa, "--on", pb, "--out", tmp_path / "c.patch", *common)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["changed"] == [f"{fact['prompt'].format(fact['subject'])}:{fact['target_new']} -> Mars"]
    assert report["made_on"] == [a.patch_id, b.patch_id] and report["preserved_keys"] == 3  # 4 facts, 1 changed

    out = make_patch_cli("--withdraw", fact["subject"], "--on", pa, "--on", pb, "--out", tmp_path / "w.patch",
                         *common)
    assert out.returncode == 0, out.stderr
    withdrawn = load_patch(tmp_path / "w.patch").requests
    assert withdrawn == [{**fact, "target_new": fact["target_true"], "target_true": fact["target_new"]}]

    for args, message in ((["--withdraw", "Nobody"], "no fact of the --on patches"),
                          (["--withdraw", fact["subject"]], "needs the patches that made the facts"),
                          (["--requests", change, "--on", pb], "was made on the stack")):
        on = ["--on", pa, "--on", pb] if "Nobody" in args else []
        out = make_patch_cli(*args, *on, "--out", tmp_path / "x.patch", *common)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "x.patch").exists()


def test_alphaedit_and_preserve_are_recorded_and_preserve_holds_the_prompts(tiny_models, data_dir, tmp_path):
    model = tiny_models["qwen2"]
    keep = tmp_path / "keep.jsonl"
    keep.write_text('{"prompt": "The capital of France is", "answer": "Paris"}\n"Water boils at"\n')
    result = tiny_edit(model, reqs(data_dir, 0, 2), data_dir, tmp_path, method="alphaedit", preserve=keep,
                       hparams={"nullspace_threshold": 1.0, "L2": 1.0})
    assert result.patch.hparams["method"] == "alphaedit" and result.report.method == "alphaedit"
    assert result.report.preserved_keys > 0
    with pytest.raises(MemitError, match="method must be one of memit, alphaedit"):
        tiny_edit(model, reqs(data_dir, 0, 2), data_dir, tmp_path, method="rome")


def test_preserve_weight_counts_each_prompt_key_that_many_times(tiny_models, data_dir, tmp_path):
    model, prompts = tiny_models["llama"], ['"The capital of France is"\n', '"Water boils at"\n']
    once, twice = tmp_path / "once.jsonl", tmp_path / "twice.jsonl"
    once.write_text("".join(prompts))
    twice.write_text("".join(prompts * 2))
    weighted = tiny_edit(model, reqs(data_dir, 0, 2), data_dir, tmp_path, preserve=once,
                         hparams={"preserve_weight": 2.0}).patch
    repeated = tiny_edit(model, reqs(data_dir, 0, 2), data_dir, tmp_path, preserve=twice).patch
    plain = tiny_edit(model, reqs(data_dir, 0, 2), data_dir, tmp_path, preserve=once).patch
    assert weighted.hparams["preserve_weight"] == 2.0
    for name, delta in weighted.deltas.items():
        assert torch.allclose(delta, repeated.deltas[name], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(delta, plain.deltas[name], rtol=1e-4, atol=1e-7)


def _outputs(model, patches, prompts, layer):
    """Layer `layer`'s outputs at every position of `prompts` with `patches` merged (transformers)."""
    from memit_vllm.evaluate.patching import load_model, merge_into_model

    ckpt = Checkpoint(model)
    net, tok = load_model(ckpt)
    if patches:
        merge_into_model(net, ckpt, patches)
    with torch.no_grad():
        return torch.cat([net(**tok(p, return_tensors="pt"), output_hidden_states=True).hidden_states[layer + 1][0]
                          for p in prompts])


def test_restore_pulls_preserved_prompts_back_to_the_stacks_outputs_where_hold_lets_the_update_move_them(
        lineage, data_dir, tmp_path):
    """preserve_restore: the prompts a patch on a stack preserves end near the outputs the stack gave them
    (the update's lower layers' drift undone, the stack's own kept: pulling that back took its edits'
    reach with it); holding them each layer at a time lets the update's compounding move them."""
    model, a, _ = lineage
    prompts = [r.text() for r in reqs(data_dir, 8, 6)]  # other subjects, CounterFact's relation templates
    keep = tmp_path / "keep.jsonl"
    keep.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    made = {restore: tiny_edit(model, reqs(data_dir, 2, 2), data_dir, tmp_path, on=[a], preserve=keep,
                               hparams={"preserve_weight": 4.0, "preserve_restore": restore}).patch
            for restore in (False, True)}
    top = a.hparams["layers"][-1]
    base, stack = _outputs(model, [], prompts, top), _outputs(model, [a], prompts, top)
    after = {restore: _outputs(model, [a, p], prompts, top) for restore, p in made.items()}
    moved = {restore: float((out - stack).norm()) for restore, out in after.items()}
    assert moved[True] < 0.9 * moved[False], moved  # 0.0077 against 0.0097 when written
    # the anchor is the stack: the stack's drift (0.072) stays, where a pull to the base took it to 0.010
    assert float((after[True] - base).norm()) > 0.5 * float((stack - base).norm())
    assert made[True].hparams["preserve_restore"] is True
    with pytest.raises(MemitError, match="preserve_restore must be true or false"):
        tiny_edit(model, reqs(data_dir, 2, 2), data_dir, tmp_path, hparams={"preserve_restore": 1})


def test_corpus_restore_pulls_the_corpus_texts_back_to_the_base_and_the_edits_still_land(tiny_models, data_dir,
                                                                                         tmp_path):
    """corpus_restore_tokens: the upper layers pull the first corpus tokens' outputs at the last edited layer
    back to where the model had them (here the base), undoing the lower layers' leak there (whether that
    carries over to other text is the benchmark's: docs/hyperparameters.md "Session 20"); the edits' own
    outputs still move."""
    model, layers = tiny_models["llama"], [0, 1, 2, 3]
    texts = [json.loads(line)["text"][:300] for line in (data_dir / CORPUS).read_text().splitlines()[:5]]
    edited = [r.text() for r in reqs(data_dir, 0, 4)]
    made = {n: tiny_edit(model, reqs(data_dir, 0, 4), data_dir, tmp_path,
                         hparams={"corpus_restore_tokens": n, "layers": layers}).patch for n in (0, 3000)}

    def moved(prompts):
        base = _outputs(model, [], prompts, layers[-1])
        return {n: float((_outputs(model, [p], prompts, layers[-1]) - base).norm()) for n, p in made.items()}
    on_texts, on_edits = moved(texts), moved(edited)
    assert on_texts[3000] < 0.9 * on_texts[0]  # within the first 3,000 tokens: pulled
    assert on_edits[3000] > 0.5 * on_edits[0]
    assert made[3000].hparams["corpus_restore_tokens"] == 3000


def test_own_prompt_weight_holds_the_edit_prompts_but_at_the_subjects_last_token(tiny_models, data_dir, tmp_path):
    """own_prompt_weight: the update leaves the edit prompts' outputs alone at every position but the subject's
    last token, where the edit still lands."""
    from transformers import AutoTokenizer

    from memit_vllm.editor.preserve import own_prompts

    model, layers, requests = tiny_models["llama"], [0, 1, 2, 3], reqs(data_dir, 0, 4)
    made = {w: tiny_edit(model, requests, data_dir, tmp_path, hparams={"own_prompt_weight": w, "layers": layers})
            for w in (0.0, 4.0)}
    tok = AutoTokenizer.from_pretrained(model)
    own = own_prompts(tok, requests)
    lengths = [len(tok(p.prompt)["input_ids"]) for p in own]
    starts = np.cumsum([0, *lengths[:-1]])
    at_key = torch.zeros(sum(lengths), dtype=torch.bool)
    at_key[torch.tensor([s + p.skip for s, p in zip(starts, own)])] = True
    base = _outputs(model, [], [p.prompt for p in own], layers[-1])
    moved = {w: (_outputs(model, [r.patch], [p.prompt for p in own], layers[-1]) - base).norm(dim=1)
             for w, r in made.items()}
    elsewhere = {w: float(m[~at_key].norm()) for w, m in moved.items()}
    at_edit_key = {w: float(m[at_key].norm()) for w, m in moved.items()}
    assert elsewhere[4.0] < 0.5 * elsewhere[0.0], elsewhere  # 1.64 against 6.42 when written
    assert at_edit_key[4.0] > 0.7 * at_edit_key[0.0], at_edit_key  # 7.78 against 8.72
    assert made[4.0].report.preserved_keys == made[4.0].report.own_prompt_keys == sum(lengths) - len(requests)
    assert made[0.0].report.preserved_keys == made[0.0].report.own_prompt_keys == 0
    assert made[4.0].patch.hparams["own_prompt_weight"] == 4.0
    with pytest.raises(MemitError, match="own_prompt_weight must be a number >= 0"):
        tiny_edit(model, requests, data_dir, tmp_path, hparams={"own_prompt_weight": -1})


def test_neighbour_subjects_ask_each_edit_of_other_subjects(tiny_models, data_dir, tmp_path):
    from memit_vllm.editor.preserve import neighbour_prompts

    requests = reqs(data_dir, 0, 3)
    pool = [r.subject for r in reqs(data_dir, 3, 40)] + [requests[0].subject]
    prompts = neighbour_prompts(requests, pool, 4, seed=0)
    assert len(prompts) == 12 and prompts == neighbour_prompts(requests, pool, 4, seed=0)
    earlier = set(pool[:30])  # subjects a lineage edited: their facts are not the base's to keep
    assert not any(s in p.prompt for s in earlier for p in neighbour_prompts(requests, pool, 4, 0, edited=earlier))
    for i, r in enumerate(requests):
        mine = prompts[4 * i:4 * i + 4]
        pre, post = r.prompt.split("{}")
        assert all(p.prompt.startswith(pre) and p.prompt.endswith(post) and p.answer is None for p in mine)
        assert not any(e.subject in p.prompt for e in requests for p in mine)  # never an edited subject
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("\n".join(pool) + "\n")
    model = tiny_models["llama"]
    result = tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects=subjects, neighbours_per_edit=4)
    plain = tiny_edit(model, requests, data_dir, tmp_path)
    assert result.report.preserved_keys > 0 == plain.report.preserved_keys
    assert result.patch.patch_id != plain.patch.patch_id
    again = tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects=subjects, neighbours_per_edit=4)
    assert again.patch.patch_id == result.patch.patch_id  # the same seed samples the same subjects
    subjects.write_text("\n".join(r.subject for r in requests))
    with pytest.raises(MemitError, match=re.escape(f"--neighbour-subjects {subjects}: every subject in it is being")):
        tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects=subjects)
    with pytest.raises(MemitError, match="--neighbour-subjects /dev/zero does not exist"):
        tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects="/dev/zero")


def test_neighbours_per_edit_default_falls_with_the_batch(tiny_models, data_dir, tmp_path, monkeypatch):
    """Without --neighbours-per-edit: 10 per edit up to 316 edits, then (1,000 / edits)^2 (4 at 500, 1 from 708,
    never under 1), as if given; the report says how many each edit's prompt was asked of."""
    from memit_vllm.editor import hparams

    per_edit = [hparams.default_neighbours_per_edit(n) for n in (1, 100, 316, 317, 500, 707, 708, 1000, 10000)]
    assert per_edit == [10, 10, 10, 9, 4, 2, 1, 1, 1]
    assert hparams.neighbours_default_text() == "10, fewer in batches of over 316 edits ((1,000 / edits)^2: 4 at " \
        "500, 1 from 708)"
    model, requests = tiny_models["llama"], reqs(data_dir, 0, 3)
    monkeypatch.setattr(hparams, "NEIGHBOURS_SCALE", 5)  # so that these 3 edits are a large batch: 2 per edit
    auto = tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects="vocab:50")
    two = tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects="vocab:50", neighbours_per_edit=2)
    four = tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects="vocab:50", neighbours_per_edit=4)
    assert [r.report.neighbours_per_edit for r in (auto, two, four)] == [2, 2, 4]
    assert [r.patch.hparams["neighbours_per_edit"] for r in (auto, two, four)] == [2, 2, 4]  # the patch says so too
    assert auto.patch.patch_id == two.patch.patch_id != four.patch.patch_id
    assert auto.report.preserved_keys == two.report.preserved_keys < four.report.preserved_keys
    plain = tiny_edit(model, requests, data_dir, tmp_path)  # no neighbours asked
    assert (plain.report.neighbours_per_edit, plain.patch.hparams["neighbours_per_edit"]) == (0, None)
    for bad in (0, True, 2.5):
        with pytest.raises(MemitError, match=f"neighbours_per_edit must be an integer >= 1 .*not {bad!r}"):
            tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects="vocab:50", neighbours_per_edit=bad)


def test_vocabulary_neighbours_need_no_file_and_are_seeded(tiny_models, data_dir, tmp_path, monkeypatch):
    """--neighbour-subjects vocab:N: made-up names from the tokenizer's words stand in for a subjects file
    (the same seed gives the same patch); a malformed spec fails before the model loads."""
    from transformers import AutoTokenizer

    from memit_vllm.editor import memit
    from memit_vllm.editor.preserve import vocabulary_subjects

    model, requests = tiny_models["llama"], reqs(data_dir, 0, 2)
    result = tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects="vocab:50", neighbours_per_edit=3)
    assert result.report.preserved_keys > 0
    again = tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects="vocab:50", neighbours_per_edit=3)
    assert again.patch.patch_id == result.patch.patch_id
    names = vocabulary_subjects(AutoTokenizer.from_pretrained(model), 50, seed=0)
    assert len(names) == 50 and all(len(n.split()) == 2 and n.split()[0][0].isupper() for n in names)
    monkeypatch.setattr(memit, "load_editable", lambda *a, **k: pytest.fail("the model was loaded"))
    for bad in ("vocab:", "vocab:x", "vocab:0", "model:", "model:-3"):
        with pytest.raises(MemitError, match=f"--neighbour-subjects '{bad}': expected {bad[:5]}:N"):
            tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects=bad)


def test_a_recipe_file_names_its_neighbours_and_the_flag_overrides_it(tiny_models, data_dir, tmp_path):
    """hparams neighbour_subjects (what a recipe file holds) works as --neighbour-subjects does and is recorded
    in the patch; the flag wins, and `none` turns them off whatever the hparams say."""
    model, requests = tiny_models["llama"], reqs(data_dir, 0, 2)
    by_file = tiny_edit(model, requests, data_dir, tmp_path, hparams={"neighbour_subjects": "vocab:50"},
                        neighbours_per_edit=3)
    by_flag = tiny_edit(model, requests, data_dir, tmp_path, neighbour_subjects="vocab:50", neighbours_per_edit=3)
    assert by_file.report.preserved_keys == by_flag.report.preserved_keys > 0
    assert all(torch.equal(by_file.patch.deltas[n], by_flag.patch.deltas[n]) for n in by_flag.patch.deltas)
    assert by_file.patch.hparams["neighbour_subjects"] == by_flag.patch.hparams["neighbour_subjects"] == "vocab:50"
    off = tiny_edit(model, requests, data_dir, tmp_path, hparams={"neighbour_subjects": "vocab:50"},
                    neighbour_subjects="none")
    assert off.report.preserved_keys == 0 and off.patch.hparams["neighbour_subjects"] is None
    in_file = tiny_edit(model, requests, data_dir, tmp_path, hparams={"neighbour_subjects": "none"})
    assert in_file.report.preserved_keys == 0 and in_file.patch.hparams["neighbour_subjects"] is None
    plain = tiny_edit(model, requests, data_dir, tmp_path).patch
    assert all(torch.equal(off.patch.deltas[n], plain.deltas[n]) for n in plain.deltas)
    with pytest.raises(MemitError, match="neighbour_subjects must be a subjects file, model:N, vocab:N or none"):
        tiny_edit(model, requests, data_dir, tmp_path, hparams={"neighbour_subjects": " "})


def test_listed_names_are_each_items_leading_capitalised_words():
    """model:N reads the model's numbered lists: each item's name up to a bracket, colon, comma or dash, in
    quotes or not; a line that is not an item ends the list."""
    from memit_vllm.editor.preserve import _listed_names

    text = (' Paris\n2. Tomb Raider - the reboot\n3. London (UK)\n4. Everest: the tallest\n5. "The Beatles"\n'
            '6. lowercase thing\n7. Leonardo da Vinci, painter\n\nMore prose. 8. Not This')
    assert _listed_names(text) == ["Paris", "Tomb Raider", "London", "Everest", "The Beatles", "Leonardo da Vinci"]


def test_the_names_cache_reads_back_only_a_plain_file_of_names(tmp_path, monkeypatch):
    """model:N's cache: read back when it holds names; a damaged file, or a link (to /dev/zero here), is
    listed again and replaced by a plain file. (The listing itself runs on SmolLM2 in test_editor_quality.)"""
    from memit_vllm.editor import preserve

    listed = []
    monkeypatch.setattr(preserve, "model_subjects", lambda *a, **k: listed.append(1) or ["Paris", "Rome"])
    assert preserve.cached_model_subjects(tmp_path, "fingerprint", None, None, 2, seed=0) == ["Paris", "Rome"]
    assert preserve.cached_model_subjects(tmp_path, "fingerprint", None, None, 2, seed=0) == ["Paris", "Rome"]
    assert len(listed) == 1
    cache = tmp_path / "subjects" / "fingerprint" / "model2-seed0.json"
    for damage in ("[1, 2]", None):
        cache.unlink()
        if damage is None:
            cache.symlink_to("/dev/zero")
        else:
            cache.write_text(damage)
        assert preserve.cached_model_subjects(tmp_path, "fingerprint", None, None, 2, seed=0) == ["Paris", "Rome"]
        assert cache.is_file() and not cache.is_symlink()
    assert len(listed) == 3


def test_a_model_that_lists_no_names_fails_with_the_fix_and_writes_nothing(tiny_models, data_dir, tmp_path):
    """A random tiny model writes no numbered list of names: model:N says so, names the alternatives, and
    caches nothing."""
    with pytest.raises(MemitError, match=r"model:50: the model listed \d+ usable names; give --neighbour-subjects"):
        tiny_edit(tiny_models["llama"], reqs(data_dir, 0, 2), data_dir, tmp_path, neighbour_subjects="model:50")
    assert not list((tmp_path / "cache").glob("subjects/*/*.json"))  # nothing cached to be read back


def test_patch_tools_refuse_a_child_without_its_stack_and_change_nothing(lineage, tmp_path, data_dir):
    from click.testing import CliRunner

    from memit_vllm.cli import main

    model, a, b = lineage
    pa, pb = a.save(tmp_path / "a.patch"), b.save(tmp_path / "b.patch")

    def cli(*args):
        return CliRunner().invoke(main, [str(x) for x in args])

    for args in (["verify", pb, "--model", model], ["verify", pb, pa, "--model", model],
                 ["apply", pb, "--model", model, "--out", tmp_path / "out"],
                 ["stack", pb, pa, "-o", tmp_path / "s.patch"], ["export-lora", pb, "-o", tmp_path / "lora"],
                 ["eval", "--model", model, "--patch", pb, "--n", 1,
                  "--data", data_dir / "counterfact" / "counterfact_500.json"]):
        out = cli(*args)
        assert out.exit_code == 2 and "was made on the stack" in out.output, (args, out.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.patch", "b.patch", "cache"]
    out = cli("verify", pa, pb, "--model", model, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["stack"] == [a.patch_id, b.patch_id]
    assert "made on" in cli("inspect", pb).output


def test_lineage_keys_are_cached_and_a_cold_cache_makes_the_same_patch(lineage, data_dir, tmp_path):
    """The lineage's keys come from the cache entries the earlier patches wrote (none read again); with no
    cache, or a damaged entry, they are read on base + the stack up to their patch: the same patch."""
    model, a, b = lineage  # b, made on a, cached a's keys (read then) and its own
    warm = tiny_edit(model, reqs(data_dir, 4, 2), data_dir, tmp_path, on=[a, b])
    assert warm.report.lineage_keys_read == 0 and warm.report.preserved_keys == 4
    cold = tiny_edit(model, reqs(data_dir, 4, 2), data_dir, tmp_path / "other", on=[a, b])
    assert cold.report.lineage_keys_read == 2
    entries = sorted((tmp_path / "cache" / "lineage-keys").rglob("*.safetensors"))
    assert len(entries) == 3  # a's, b's and the warm child's
    for f in entries:
        f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning, match="lineage key cache entry .* cannot be read"):
        damaged = tiny_edit(model, reqs(data_dir, 4, 2), data_dir, tmp_path, on=[a, b])
    assert damaged.report.lineage_keys_read == 2
    for other in (cold, damaged):
        for n in warm.patch.deltas:
            torch.testing.assert_close(other.patch.deltas[n], warm.patch.deltas[n], rtol=1e-6, atol=1e-7)
    current = tiny_edit(model, reqs(data_dir, 4, 2), data_dir, tmp_path, on=[a, b],
                        hparams={"lineage_keys": "current"})
    assert current.report.lineage_keys_read == 0 and current.report.preserved_keys == 4
    assert current.patch.hparams["lineage_keys"] == "current"
    # a's keys re-read on base + a + b are not those cached on base + a: b edited the layers below them
    assert any(not torch.equal(current.patch.deltas[n], warm.patch.deltas[n]) for n in warm.patch.deltas)
