"""Edits over time: batches of edits made one after another, and what each way of making them keeps.

Arms (each a lineage of patch files in --out/ARM/, written batch by batch; a rerun resumes from the
patches it finds, so a long run can stop and continue):
- independent: every batch made on the bare base, the patches stacked (memit-vllm before `--on`);
- memit: each batch made `--on` the earlier ones, plain MEMIT (`preserve_lineage` false: the
  reference's sequential MEMIT);
- memit-kp: the same with the lineage's facts as preserved keys (make-patch's default with `--on`);
- alphaedit: each batch `--on` the earlier ones with `--method alphaedit`;
- onebatch: all edits so far in one patch on the base (the reference point; remade at each step).
After each batch, on every edit made so far: ES, PS, NS (teacher forced, as `eval`), and the share of
greedy rewrite completions that start with the new target; retention of what was not edited: NS on
200 fixed untouched records (the last 200 of the data file) and the mean token NLL of the held-out
corpus slice (eval --generate's, which the statistics here exclude). A Markdown table, the JSON of
every point (--out/results.json) and a PNG of the curves (--plot).

    .venv/bin/python bench/sequential.py --batch 100 --batches 10 --out /work/benchout/seq \\
        --arms independent,memit,memit-kp,alphaedit --plot docs/sequential.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memit_vllm import make_patch
from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.records import parse_record, read_dataset, without_conflicts
from memit_vllm.evaluate.generation import HELDOUT_DEFAULT, covariance_budget, heldout_texts
from memit_vllm.evaluate.metrics import target_hit
from memit_vllm.evaluate.patching import load_model, merge_into_model
from memit_vllm.evaluate.run import measure_counterfact
from memit_vllm.evaluate.scoring import TransformersScorer, encode_pair
from memit_vllm.patch import load_patch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_edit_10k.json"
ARMS = {"independent": None, "memit": {"preserve_lineage": False}, "memit-kp": {}, "alphaedit": {"method": "alphaedit"},
        "onebatch": None}
UNTOUCHED = 200


def batch_patch(arm: str, t: int, batches: list[list], args, budget: int, earlier: list[Path]) -> Path:
    """Batch t's patch of `arm` (made now, or found from an earlier run)."""
    path = Path(args.out) / arm / f"batch-{t:03d}.patch"
    if path.is_file():
        return path
    start = time.monotonic()
    if arm == "onebatch":
        requests, on, hparams = [r for b in batches[:t + 1] for r in b], [], None
    else:
        requests, hparams = batches[t], ARMS[arm]
        on = [] if arm == "independent" else earlier
    make_patch(args.model, requests, on=on, hparams=hparams, stats_corpus=str(HELDOUT_DEFAULT), stats_tokens=budget,
               name=f"{arm}-{t}", progress=False).save(path)
    print(f"{arm} batch {t}: made in {time.monotonic() - start:.0f} s", flush=True)
    return path


@torch.no_grad()
def nll(model, texts: list[list[int]]) -> float:
    """Mean per-token NLL of the held-out texts (one text per forward: no padding to mask)."""
    total = 0.0
    for ids in texts:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    return total / sum(len(ids) - 1 for ids in texts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--arms", default="independent,memit,memit-kp,alphaedit")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", help="PNG of the curves")
    args = ap.parse_args()
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    n = args.batch * args.batches
    raw, dropped = without_conflicts(args.data, None)
    edits, untouched = raw[:n], raw[-UNTOUCHED:]
    print(f"{len(edits)} edits in {args.batches} batches of {args.batch}; {dropped} conflicting records skipped")
    batches = [[parse_record(r, f"record {i}") for i, r in enumerate(edits[s:s + args.batch])]
               for s in range(0, n, args.batch)]
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    (work / "edits.json").write_text(json.dumps(edits))
    (work / "untouched.json").write_text(json.dumps(untouched))
    _, edit_records = read_dataset(work / "edits.json")
    _, untouched_records = read_dataset(work / "untouched.json")

    ckpt = Checkpoint(args.model)
    model, tok = load_model(ckpt)
    scorer = TransformersScorer(model, tok, progress=False)
    budget = covariance_budget(tok, HELDOUT_DEFAULT)
    texts = [tok(t, truncation=True, max_length=256)["input_ids"] for t in heldout_texts(HELDOUT_DEFAULT)]
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if "unedited" not in results:
        results["unedited"] = {"untouched_NS": measure_counterfact(scorer, untouched_records)["NS"],
                               "heldout_nll": nll(model, texts)}
    for arm in arms:
        patches: list[Path] = []
        for t in range(args.batches):
            patches.append(batch_patch(arm, t, batches, args, budget, list(patches)))
            key = f"{arm}/{t}"
            if key in results:
                continue
            stack = [load_patch(patches[-1])] if arm == "onebatch" else [load_patch(p) for p in patches]
            unedited = merge_into_model(model, ckpt, stack)
            seen = edit_records[:(t + 1) * args.batch]
            tf = measure_counterfact(scorer, seen)
            hits = [target_hit(c, encode_pair(tok, r.rewrite_prompt, r.target_new)[1]) for c, r in
                    zip(scorer.greedy([r.rewrite_prompt for r in seen], 8), seen)]
            results[key] = {"edits": len(seen), **{k: tf[k] for k in ("ES", "PS", "NS")},
                            "rewrite_hit": sum(hits) / len(hits),
                            "untouched_NS": measure_counterfact(scorer, untouched_records)["NS"],
                            "heldout_nll": nll(model, texts)}
            for name, value in unedited.items():  # back to the base for the next point
                model.get_parameter(name).data.copy_(value)
            results_file.write_text(json.dumps(results, indent=1))
            print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[key].items() if k != "edits"),
                  flush=True)

    base = results["unedited"]
    print(f"\nunedited: untouched NS {base['untouched_NS']:.3f}, held-out NLL {base['heldout_nll']:.3f}\n")
    cols = ["ES", "PS", "NS", "rewrite_hit", "untouched_NS", "heldout_nll"]
    print("| arm | edits | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for arm in arms:
        for t in range(args.batches):
            r = results[f"{arm}/{t}"]
            print(f"| {arm} | {r['edits']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    if args.plot:
        plot(results, arms, args.batches, cols, base, args.plot)


def plot(results, arms, batches, cols, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2))
    for ax, col in zip(axes, cols):
        for arm in arms:
            pts = [results[f"{arm}/{t}"] for t in range(batches)]
            ax.plot([p["edits"] for p in pts], [p[col] for p in pts], marker="o", label=arm)
        if col in base:
            ax.axhline(base[col], color="grey", linestyle="--", linewidth=1)
        ax.set_title(col)
        ax.set_xlabel("edits")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
