"""Where whole completions part (issue 18): of the unrelated prompts' greedy completions, the token at
which the edited model first leaves the unedited one, how sure the unedited model was there, and whether
a patch parts them more than an update of no particular direction that moves held-out text as much.

Teacher-forced on the unedited completion, the edited model keeps the whole completion exactly when its
argmax is the unedited token at every position (greedy decoding of both would agree), so one forward per
prompt answers it and says where it first parts. The prompts and the held-out texts are
`eval --generate`'s (the rewrite prompts of the records after the edited ones; the last texts of the
covariance corpus), and the KL is its exact one (TransformersScorer.heldout_kl), the unedited weights
swapped into the one model loaded.

Perturbations, each with its held-out KL: the patch times each of --scales, and two updates of no
particular direction scaled to the patch's held-out KL: "gaussian" (per patched layer a Gaussian matrix)
and "shuffled keys" (the patch's delta with its key-side columns permuted: the same singular values and
output directions, read off random key directions).

`--by-relation`: the patch's first-token flips grouped by how many of the --n edited records change the
prompt's relation (CounterFact `relation_id`), and how many flip to a word some edit's new target starts
with (the edited association reaching other subjects).

    .venv/bin/python bench/divergence.py PATCH --data ../shared/data/counterfact/counterfact_500.json \
        --n 100 [--model smollm2-135m] [--scales 0.25 0.5 1] [--unrelated-count 400] [--by-relation] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch

from memit_vllm.checkpoint import Checkpoint, resolve_model_path
from memit_vllm.core.records import read_dataset
from memit_vllm.evaluate.generation import NEW_TOKENS, generation_task, unrelated_prompts
from memit_vllm.evaluate.metrics import CONFIDENT_MARGIN
from memit_vllm.evaluate.patching import load_model, merge_into_model, swapped
from memit_vllm.evaluate.scoring import TransformersScorer
from memit_vllm.patch import load_patch

PARTS = ((1, 1), (2, 2), (3, 4), (5, 8))  # first-divergence positions reported together (1-based, inclusive)
RELATION_EDITS = ((0, 0), (1, 2), (3, 5), (6, None))  # --by-relation's groups: edits of the prompt's relation
CALIBRATION_STEPS = 2  # rescalings towards the patch's KL; the last one is the row reported, with its own KL


@torch.no_grad()
def completion_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The model's logits at each completion token, teacher forced on the prompt and the tokens before it."""
    return model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]


def parting(model, prompts: list[list[int]], completions: list[list[int]]) -> tuple[list[int | None], list[int]]:
    """Per prompt, the 1-based position of the first completion token that is not the model's argmax
    after the prompt and the completion's tokens before it (None where the model keeps it all), and the
    model's argmax after the prompt (its first token)."""
    parts, firsts = [], []
    for prompt, completion in zip(prompts, completions):
        argmax = completion_logits(model, prompt, completion).argmax(-1).tolist()
        parts.append(next((i + 1 for i, (a, b) in enumerate(zip(argmax, completion)) if a != b), None))
        firsts.append(argmax[0])
    return parts, firsts


def unedited_margins(model, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """Top-1 minus top-2 probability of the unedited model at each completion token."""
    out = []
    for prompt, completion in zip(prompts, completions):
        top2 = torch.softmax(completion_logits(model, prompt, completion).float(), -1).topk(2, -1).values
        out.append((top2[:, 0] - top2[:, 1]).tolist())
    return out


def flips_by_relation(data: str, n: int, prompts: list[str], flipped: list[bool], firsts: list[str]) -> list[dict]:
    """Per group of RELATION_EDITS, the unrelated prompts whose relation that many of the first `n` records
    edit, how many flipped their first token, and how many of those to a word an edit's new target starts with."""
    raw = json.loads(Path(data).read_text())
    rewrite = [r["requested_rewrite"] for r in raw]
    edits = Counter(q["relation_id"] for q in rewrite[:n])
    relation = {q["prompt"].format(q["subject"]): q["relation_id"] for q in rewrite[n:]}
    targets = [q["target_new"]["str"].strip() for q in rewrite[:n]]
    rows = []
    for lo, hi in RELATION_EDITS:
        group = [i for i, p in enumerate(prompts) if lo <= edits[relation[p]] <= (hi if hi is not None else n)]
        flips = [i for i in group if flipped[i]]
        label = f"{lo}+" if hi is None else f"{lo}-{hi}" if hi != lo else str(lo)
        rows.append({"edits_of_relation": label, "prompts": len(group), "flipped": len(flips),
                     "to_a_new_target": sum(bool(firsts[i]) and any(t.startswith(firsts[i]) for t in targets)
                                            for i in flips)})
    return rows


def summary(parts: list[int | None], margins: list[list[float]]) -> dict:
    n = len(parts)
    at = [m[p - 1] for p, m in zip(parts, margins) if p is not None]
    row = {"first_token_kept": sum(p != 1 for p in parts) / n, "all_kept": sum(p is None for p in parts) / n}
    for lo, hi in PARTS:
        row[f"parts_at_{lo}-{hi}"] = sum(p is not None and lo <= p <= hi for p in parts) / n
    row["median_margin_where_parted"] = sorted(at)[len(at) // 2] if at else math.nan
    row["parted_below_0.1"] = sum(m < 0.1 for m in at) / max(len(at), 1)
    return row


class Perturbed:
    """The evaluated model: the unedited weights plus a chosen update of the patched down-projections."""

    def __init__(self, ckpt: Checkpoint, patches):
        self.model, self.tok = load_model(ckpt)
        self.original = merge_into_model(self.model, ckpt, patches)
        self.delta = {n: self.model.get_parameter(n).detach() - w for n, w in self.original.items()}

    @torch.no_grad()
    def set(self, update: dict[str, torch.Tensor], scale: float) -> None:
        for name, w in self.original.items():
            self.model.get_parameter(name).copy_(w + scale * update[name])

    def gaussian(self, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(d.shape, generator=g) * d.norm() / math.sqrt(d.numel()) for n, d in self.delta.items()}

    def shuffled_keys(self, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {n: d[:, torch.randperm(d.shape[1], generator=g)] for n, d in self.delta.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patches", nargs="+")
    parser.add_argument("--data", required=True, help="the edits' CounterFact file (unrelated prompts follow them)")
    parser.add_argument("--n", type=int, default=100, help="records edited (eval --n)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--unrelated-count", type=int, metavar="N",
                        help="score N unrelated prompts instead of eval's 100 (as eval --unrelated-count)")
    parser.add_argument("--by-relation", action="store_true",
                        help="the patch's first-token flips by how often the batch edits the prompt's relation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    ckpt = Checkpoint(resolve_model_path(args.model))
    patches = [load_patch(p) for p in args.patches]
    work = Perturbed(ckpt, patches)
    unedited = lambda: swapped(work.model, work.original)  # noqa: E731
    _, records = read_dataset(args.data, args.n, "counterfact")
    prompts, source = unrelated_prompts(args.data, "counterfact", records, patches, count=args.unrelated_count)
    texts = generation_task(work.tok, "counterfact", records, prompts, source, None, patches).heldout
    scorer = TransformersScorer(work.model, work.tok, progress=False)
    with unedited():
        completions = [list(c.tokens) for c in scorer.greedy(prompts, NEW_TOKENS)]
        prompt_ids = [work.tok(p)["input_ids"] for p in prompts]
        margins = unedited_margins(work.model, prompt_ids, completions)
    rows, firsts = {}, {}

    def measure(name: str, update, scale: float) -> float:
        work.set(update, scale)
        kl, _ = scorer.heldout_kl(texts, unedited)  # eval --generate's exact KL
        parts, firsts[name] = parting(work.model, prompt_ids, completions)
        rows[name] = {"scale": scale, "kl": kl, **summary(parts, margins)}
        print(name, json.dumps(rows[name]), flush=True)
        return kl

    measure("unedited (numerics: batched greedy vs one forward)", work.delta, 0.0)
    target = None
    for s in sorted(args.scales):
        kl = measure(f"patch x {s:g}", work.delta, s)
        target = kl if s == 1 else target
    target = target if target is not None else measure("patch x 1", work.delta, 1.0)
    if args.by_relation:  # the first tokens of the patch itself, as its row read them
        patched = firsts["patch x 1"]
        flipped = [f != c[0] for f, c in zip(patched, completions)]
        rows_by_relation = flips_by_relation(args.data, args.n, prompts, flipped,
                                             [work.tok.decode([f]).strip() for f in patched])
        print(f"first tokens flipped by the patch: {sum(flipped)} of {len(prompts)}")
        print("| edits of the prompt's relation | prompts | flipped | to a word a new target starts with |\n"
              "|---|---|---|---|")
        for r in rows_by_relation:
            print(f"| {r['edits_of_relation']} | {r['prompts']} | {r['flipped']} | {r['to_a_new_target']} |")
    for name, update in (("gaussian", work.gaussian(args.seed)), ("shuffled keys", work.shuffled_keys(args.seed))):
        scales, kls = [1.0], [measure(name, update, 1.0)]
        for _ in range(CALIBRATION_STEPS):  # KL ~ t^p, p from the last two points (2 at first)
            p = 2.0 if len(kls) < 2 else math.log(kls[-1] / kls[-2]) / math.log(scales[-1] / scales[-2])
            scales.append(scales[-1] * (target / kls[-1]) ** (1 / p))
            kls.append(measure(name, update, scales[-1]))
    confident = [m[0] >= CONFIDENT_MARGIN for m in margins]
    fragile = [min(m) for m in margins]
    print(f"{len(prompts)} unrelated prompts; unedited first token confident (>= {CONFIDENT_MARGIN}): "
          f"{sum(confident)}; median of each completion's smallest margin: {sorted(fragile)[len(fragile) // 2]:.3f}")
    cols = ["kl", "first_token_kept", "all_kept", *[f"parts_at_{lo}-{hi}" for lo, hi in PARTS],
            "median_margin_where_parted", "parted_below_0.1"]
    print("| update | scale | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2))
    for name, row in rows.items():
        print(f"| {name} | {row['scale']:.3g} | " + " | ".join(f"{row[c]:.3f}" if c != "kl" else f"{row[c]:.4f}"
                                                                for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prompts": len(prompts), "smallest_margins": fragile, "rows": rows,
                       "by_relation": rows_by_relation if args.by_relation else None}, f, indent=1)


if __name__ == "__main__":
    main()
