"""At which token positions a patch's update makes, or breaks, its own edits (issue 18, at 1,000 edits).

The patch's deltas added only at chosen positions of each rewrite prompt (drift_sources.masked_deltas, at
drift_sources.POSITIONS; the weights stay the base's). Per choice: how often the next-token argmax is the new
target's first token, its mean probability, and P(new) > P(true) on that token.
A gap between "subject tokens" and "all" is what the update's changes at the other positions (the relation's
words, shared by every edit of that relation) cost the edits.

    .venv/bin/python bench/rewrite_positions.py default1000.patch \\
        --data ../shared/data/counterfact/counterfact_edit_10k.json --n 1000
"""

from __future__ import annotations

import argparse

import torch
from drift_sources import POSITIONS, masked_deltas, subject_positions
from update_sweep import DATA

from memit_vllm import load_patch
from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.records import read_dataset
from memit_vllm.core.tokens import target_ids
from memit_vllm.editor import load_editable


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patch")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact_500.json"))
    ap.add_argument("--n", type=int, default=100, help="the first N records: the patch's edits")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tok, em = load_editable(Checkpoint(args.model))
    deltas = load_patch(args.patch).deltas
    delta = {l: deltas[em.arch.weight_name(l)].float() for l in range(em.n_layers) if em.arch.weight_name(l) in deltas}
    prompts = [(*subject_positions(tok, r.prompt, r.subject), target_ids(tok, " " + r.target_new)[0],
                target_ids(tok, " " + r.target_true)[0]) for r in read_dataset(args.data, args.n)[1]]
    where = masked_deltas(em, delta)
    print(f"{args.patch}: {len(prompts)} rewrite prompts\n\n| positions | argmax = new | P(new) | P(new) > P(true) |\n"
          "|---|---|---|---|")
    for name, positions in {"none": lambda n, subj: [], **POSITIONS}.items():
        hit, p_new, wins = [], [], []
        for ids, subject, new, true in prompts:
            where["mask"] = torch.zeros(len(ids))
            where["mask"][list(positions(len(ids), subject))] = 1
            p = em.model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
            hit.append(float(p.argmax() == new))
            p_new.append(float(p[new]))
            wins.append(float(p[new] > p[true]))
        mean = lambda x: sum(x) / len(x)  # noqa: E731
        print(f"| {name} | {mean(hit):.3f} | {mean(p_new):.3f} | {mean(wins):.3f} |", flush=True)


if __name__ == "__main__":
    main()
