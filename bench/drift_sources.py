"""Where a batch's drift on unrelated prompts enters (issue 18): by layer and by token position.

One update of the first --edits records of counterfact_500 with the preset (z from bench/update_sweep.py's
cache in --sweep, computed there if missing), then the unrelated prompts (rewrite prompts of later records, other
subjects) with the update's contribution ΔW_l k_t added only at chosen layers and token positions (forward
hooks on the down-projections; the weights stay the base's). For each choice: how often the next-token
argmax flips against the unedited model, and the mean KL(unedited || edited) of that distribution, split
by whether the prompt's relation is one the edits changed.

    .venv/bin/python bench/drift_sources.py --sweep /work/benchout/sweep [--edits 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from update_sweep import CORPUS, DATA, targets_for

from memit_vllm.cache import cache_dir
from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.records import EditRequest, load_requests
from memit_vllm.editor import EditConfig, default_hparams, load_editable
from memit_vllm.editor.arch import checkpoint_dims
from memit_vllm.editor.memit import KeyReader, delivered_updates, native_z, statistics
from memit_vllm.editor.prompts import context_templates, encode
from memit_vllm.evaluate.generation import UNRELATED_PROMPTS, covariance_budget

POSITIONS = {  # which tokens of a prompt get the update's contribution
    "all": lambda n, subj: range(n),
    "subject tokens": lambda n, subj: subj,
    "subject's last token": lambda n, subj: subj[-1:],
    "before the subject": lambda n, subj: range(subj[0]),
    "after the subject": lambda n, subj: range(subj[-1] + 1, n),
    "last token": lambda n, subj: [n - 1],
}


def subject_positions(tok, template: str, subject: str) -> tuple[list[int], list[int]]:
    """Token ids of `template` ("{}" where the subject goes) with `subject` filled in, and the positions of
    the subject's tokens (prompts.encode, as the editor finds them)."""
    enc = encode(tok, "{}", EditRequest(template, subject, ""))
    return enc.ids, enc.subject


def masked_deltas(em, delta: dict[int, torch.Tensor]) -> dict:
    """Forward hooks that add delta[l] k to layer l's down-projection output at the layers `where["layers"]`
    names and the positions `where["mask"]` ([seq] of 0/1) marks; returns `where` (every layer, no mask yet)."""
    where = {"layers": set(delta), "mask": None}

    def hook(layer):
        def add(module, inputs, out):
            if layer not in where["layers"]:
                return out
            return out + torch.nn.functional.linear(inputs[0], delta[layer]) * where["mask"][None, :, None]
        return add

    for layer in delta:
        em.down_proj(layer).register_forward_hook(hook(layer))
    return where


def unrelated(raw: list[dict], edits: int, tok) -> list[tuple[list[int], list[int], bool]]:
    """(token ids, subject token positions, relation edited?) of the unrelated prompts eval uses."""
    edited_subjects = {r["requested_rewrite"]["subject"] for r in raw[:edits]}
    edited_relations = {r["requested_rewrite"]["relation_id"] for r in raw[:edits]}
    out = []
    for r in [r for r in raw[edits:] if r["requested_rewrite"]["subject"] not in edited_subjects][:UNRELATED_PROMPTS]:
        rr = r["requested_rewrite"]
        out.append((*subject_positions(tok, rr["prompt"], rr["subject"]), rr["relation_id"] in edited_relations))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", required=True, help="bench/update_sweep.py's --out (its z cache)")
    ap.add_argument("--edits", type=int, default=100)
    args = ap.parse_args()
    data = DATA / "counterfact" / "counterfact_500.json"
    torch.set_grad_enabled(False)
    ckpt = Checkpoint("smollm2-135m")
    tok, em = load_editable(ckpt)
    hp, _ = native_z(*default_hparams(*checkpoint_dims(ckpt)), "cpu")  # the z as update_sweep keeps it
    requests = load_requests(data, limit=args.edits)
    torch.manual_seed(0)
    groups = context_templates(em.model, tok, hp.context_template_seeds, hp.context_template_length, 0)
    config = EditConfig(stats_corpus=str(CORPUS), stats_tokens=covariance_budget(tok, CORPUS), seed=0)
    stats = statistics(em, tok, ckpt, hp.replace(mom2_n_tokens=config.stats_tokens), config, cache_dir())
    targets, _ = targets_for(Path(args.sweep), stats.identity["model"], em, tok, requests,
                             [t for g in groups for t in g], hp, 0)
    base = {l: em.down_proj(l).weight.detach().clone() for l in hp.layers}
    delivered_updates(em, KeyReader(em, tok, requests, groups), hp, targets, stats, progress=False)  # no neighbours
    delta = {l: em.down_proj(l).weight.detach() - base[l] for l in hp.layers}
    for l in hp.layers:
        em.down_proj(l).weight.copy_(base[l])
        print(f"layer {l}: |dW| / |W| = {delta[l].norm() / base[l].norm():.3f}")

    prompts = unrelated(json.loads(data.read_text()), args.edits, tok)
    where = masked_deltas(em, delta)
    where["layers"] = set()
    last = lambda ids: em.model(torch.tensor([ids])).logits[0, -1].float()  # noqa: E731
    before = [last(ids) for ids, _, _ in prompts]
    matched = torch.tensor([m for _, _, m in prompts])
    print(f"{len(prompts)} unrelated prompts, {int(matched.sum())} of them with a relation the edits changed")

    def measure(layers, positions) -> str:
        where["layers"] = set(layers)
        flips, kls = [], []
        for (ids, subject, _), b in zip(prompts, before):
            where["mask"] = torch.zeros(len(ids))
            where["mask"][list(positions(len(ids), subject))] = 1
            after = last(ids)
            flips.append(float(after.argmax() != b.argmax()))
            kls.append(float((b.softmax(-1) * (b.log_softmax(-1) - after.log_softmax(-1))).sum()))
        f, k = torch.tensor(flips), torch.tensor(kls)
        return (f"| {f.mean():.3f} | {f[matched].mean():.3f} | {f[~matched].mean():.3f} | {k.mean():.4f} | "
                f"{k[matched].mean():.4f} | {k[~matched].mean():.4f} |")

    print("\n| layers | positions | flips | flips, relation edited | flips, other | KL | KL, relation edited | "
          "KL, other |\n|---|---|---|---|---|---|---|---|")
    for name, positions in POSITIONS.items():
        print(f"| all | {name} " + measure(hp.layers, positions), flush=True)
    for l in hp.layers:
        print(f"| {l} | all " + measure([l], POSITIONS["all"]), flush=True)


if __name__ == "__main__":
    main()
