"""Edits over time: batches of edits made one after another, and what each way of making them keeps.

Arms (each a lineage of patch files in --out/ARM/, written batch by batch; a rerun resumes from the
patches it finds, so a long run can stop and continue):
- independent: every batch made on the bare base, the patches stacked (memit-vllm before `--on`);
- memit: each batch made `--on` the earlier ones, plain MEMIT (`preserve_lineage` false: the
  reference's sequential MEMIT);
- memit-kp: the same with the lineage's facts as preserved keys (make-patch's default with `--on` before
  session 19);
- alphaedit: each batch `--on` the earlier ones with `--method alphaedit`;
- preserve: memit-kp plus `--preserve` of the close-neighbour suite below (with their true answers);
- neighbours: memit-kp plus `--neighbour-subjects` (10 per edit, subjects of records NEIGHBOUR_RECORDS, none
  of the untouched or close-neighbour subjects) at lambda 384 and preserve weight 1/16 (docs/hyperparameters.md,
  session 10: the configuration that kept 90% of unrelated first words for one batch of 100; `--neighbour-subjects
  vocab:N` or `model:N`: made-up names, or names the model lists, instead);
- default: each batch `--on` the earlier ones with make-patch's defaults (a preset's on-stack variant: on
  SmolLM2 steepest_fisher z, lambda 768, `model:2000` neighbours at weight 1/16);
- onebatch: all edits so far in one patch on the base (the reference point; remade at each step).
memit, memit-kp, alphaedit, preserve and neighbours keep the SmolLM2 preset of before session 19
(BEFORE_19: Adam z, no neighbours unless the arm adds them); independent, default and onebatch take
make-patch's defaults; --hparams and --z-dtype apply over every arm's.
`--cost` instead times one arm's next batch made `--on` its lineage (its keys cached, and re-read) against
the same edits on the base.
After each batch (or every --eval-every batches), on every edit made so far: ES, PS, NS (teacher forced,
as `eval`), and the share of greedy rewrite and paraphrase completions that start with the new target
(`eval --generate`'s rewrite_hit, paraphrase_hit); retention of what was not edited: NS on 200 fixed
untouched records (the last 200 of the data file), the share of their rewrite prompts whose greedy
completion keeps the unedited model's first word and all 8 tokens (eval --generate's unrelated metrics,
with these prompts as the unrelated set), NS on the close-neighbour suite (`close_neighbours`:
never-edited prompts of the same relation, words and true object as 50 edits of the first batch), and on
the held-out corpus slice (eval --generate's, which the statistics here exclude) the mean token NLL and
the next-token KL from the unedited model. A Markdown table, the JSON of every point
(--out/ARM/results.json: arms may run as parallel processes, one core each) and a PNG of the curves
(--plot).

    .venv/bin/python bench/sequential.py --batch 100 --batches 10 --out /work/benchout/seq \\
        --arms independent,memit,memit-kp,alphaedit,preserve --z-dtype bfloat16 --plot docs/sequential.png
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from transformers import AutoTokenizer

from memit_vllm import make_patch
from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.files import atomic_file
from memit_vllm.core.records import parse_record, read_dataset, without_conflicts
from memit_vllm.editor.preserve import NO_NEIGHBOURS
from memit_vllm.evaluate.generation import HELDOUT_DEFAULT, NEW_TOKENS, covariance_budget, heldout_texts
from memit_vllm.evaluate.metrics import GeneratedRecord, hit_metrics, kept_metrics
from memit_vllm.evaluate.patching import load_model, merge_into_model, swapped
from memit_vllm.evaluate.run import measure_counterfact
from memit_vllm.evaluate.scoring import TransformersScorer, encode_pair
from memit_vllm.patch import load_patch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_edit_10k.json"
# The SmolLM2 preset before session 19 (the reference's Adam z, lambda 768, no neighbours): the arms that stand
# for the reference's rules keep it; independent, default and onebatch take make-patch's defaults.
BEFORE_19 = {"v_optimizer": "adam", "v_delivery_scale": 1.0, "v_delivery_target": 0.0, "z_dtype": "float32",
             "mom2_update_weight": 768, "preserve_weight": 1.0}
ARMS = {"independent": None, "memit": BEFORE_19 | {"preserve_lineage": False}, "memit-kp": BEFORE_19,
        "alphaedit": BEFORE_19 | {"method": "alphaedit"}, "preserve": BEFORE_19,
        "neighbours": BEFORE_19 | {"mom2_update_weight": 384, "preserve_weight": 0.0625}, "default": None,
        "onebatch": None}
OWN_NEIGHBOURS = ("independent", "default", "onebatch")  # make-patch's default neighbours (the preset's)
UNTOUCHED = 200
NEIGHBOUR_RECORDS = (2000, 4000)
CLOSE_EDITS, CLOSE_PER_EDIT = 50, 4


def close_neighbours(raw: list[dict], first: int, never_edited: range) -> dict[int, list[str]]:
    """The close-neighbour suite: for up to CLOSE_EDITS of the first `first` edits, up to CLOSE_PER_EDIT
    prompts of never-edited records that ask the same relation in the same words (the prompt with the
    subject cut out) and have the same true object: "The mother tongue of Danielle Darrieux is" French ->
    English, and "The mother tongue of Blaise Pascal is" must stay French. CounterFact's own neighbours
    are mostly farther from the edit than these."""
    def template(r):
        cut = r["prompt"].rfind(r["subject"])
        return r["prompt"][:cut] + "{}" + r["prompt"][cut + len(r["subject"]):], r["ground_truth"]

    pool: dict[tuple, list[str]] = {}
    for j in never_edited:
        pool.setdefault(template(raw[j]), []).append(raw[j]["prompt"])
    suite = {}
    for i in range(first):
        prompts = [p for p in pool.get(template(raw[i]), []) if raw[i]["subject"] not in p][:CLOSE_PER_EDIT]
        if prompts and len(suite) < CLOSE_EDITS:
            suite[i] = prompts
    return suite


def batch_patch(arm: str, t: int, batches: list[list], args, budget: int, earlier: list[Path]) -> tuple[Path, float]:
    """Batch t's patch of `arm` (made now, or found from an earlier run) and the seconds making it took
    (None when found)."""
    path = Path(args.out) / arm / f"batch-{t:03d}.patch"
    if path.is_file():
        return path, None
    if arm == "onebatch":
        requests, on = [r for b in batches[:t + 1] for r in b], []
    else:
        requests, on = batches[t], [] if arm == "independent" else earlier
    patch, seconds = made(arm, requests, on, args, budget, f"{arm}-{t}")
    patch.save(path)
    print(f"{arm} batch {t}: made in {seconds:.0f} s", flush=True)
    return path, seconds


def made(arm: str, requests: list, on: list[Path], args, budget: int, name: str, **extra):
    """The patch of `requests` made by `arm`'s rule (and `extra` hparams) on base + `on`, and the seconds
    make_patch took."""
    hparams = dict(ARMS[arm] or {}) | json.loads(args.hparams) | extra
    if args.z_dtype:
        hparams["z_dtype"] = args.z_dtype
    preserve = Path(args.out) / "close-neighbours-preserve.json" if arm == "preserve" else None
    subjects = (args.neighbour_subjects or Path(args.out) / "neighbour-subjects.json") if arm == "neighbours" else \
        None if arm in OWN_NEIGHBOURS else NO_NEIGHBOURS
    start = time.monotonic()
    patch = make_patch(args.model, requests, on=on, hparams=hparams, stats_corpus=str(HELDOUT_DEFAULT),
                       stats_tokens=budget, name=name, progress=False, preserve=preserve, neighbour_subjects=subjects)
    return patch, time.monotonic() - start


def cost(arm: str, after: list, lineage: list[Path], args) -> None:
    """Issue 13's cost target: the next batch's edits made `--on` the arm's lineage against the same
    edits made on the base, in this process, base first; each patch is made whole (z, keys, solves),
    only the cached statistics (and the lineage's cached keys) shared. Then the same `--on` with the
    lineage's keys re-read on the model being edited (`lineage_keys: current`): its time, and how far its
    deltas are from the cached keys' (relative Frobenius norm of the difference, over all layers)."""
    if arm in ("independent", "onebatch"):
        raise SystemExit(f"--cost: arm {arm} makes no lineage; give one that edits --on its earlier batches")
    missing = [p for p in lineage if not p.is_file()]
    if missing:
        raise SystemExit(f"--cost: {missing[0]} is not there: run the {arm} arm to {len(lineage)} batches first")
    budget = covariance_budget(AutoTokenizer.from_pretrained(Checkpoint(args.model).path), HELDOUT_DEFAULT)
    _, alone = made(arm, after, [], args, budget, f"{arm}-cost-base")
    cached, on = made(arm, after, lineage, args, budget, f"{arm}-cost-on")
    reread, current = made(arm, after, lineage, args, budget, f"{arm}-cost-on", lineage_keys="current")
    diff = sum(float((cached.deltas[n] - reread.deltas[n]).double().norm() ** 2) for n in cached.deltas) ** 0.5
    size = sum(float(reread.deltas[n].double().norm() ** 2) for n in reread.deltas) ** 0.5
    print(json.dumps({"arm": arm, "edits": len(after), "lineage_edits": len(lineage) * args.batch,
                      "base_seconds": round(alone, 1), "on_seconds": round(on, 1), "ratio": round(on / alone, 3),
                      "current_seconds": round(current, 1), "current_ratio": round(current / alone, 3),
                      "cached_vs_current": round(diff / size, 5)}))


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
    ap.add_argument("--z-dtype", help="make-patch's z_dtype for every arm (e.g. bfloat16: ~2x faster on CPUs with "
                    "AVX-512 BF16, same scores at 100 edits: docs/benchmarks.md)")
    ap.add_argument("--hparams", default="{}", help="JSON of hyperparameters for every arm (over each arm's own), "
                    "e.g. the fast z recipe '{\"v_lr\": 2.0, \"v_early_stop_loss\": 0.3}'")
    ap.add_argument("--neighbour-subjects", help="the neighbours arm's --neighbour-subjects (default: the subjects "
                    "of records NEIGHBOUR_RECORDS), e.g. model:2000 (names the model lists) or vocab:2000 (made-up)")
    ap.add_argument("--eval-every", type=int, default=1, help="measure after every k-th batch (and the last)")
    ap.add_argument("--report-only", action="store_true", help="print the table (and plot) of what is measured")
    ap.add_argument("--cost", action="store_true", help="instead of the run: time the next batch of edits (batch "
                    "--batches) made --on the arm's first --batches patches in --out, against the same edits made "
                    "on the base (one arm; the patches are not kept)")
    args = ap.parse_args()
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    n = args.batch * args.batches
    raw, dropped = without_conflicts(args.data, None)
    if args.cost:
        if len(arms) != 1:
            raise SystemExit(f"--cost times one arm's lineage; got --arms {args.arms}")
        after = [parse_record(r, f"record {n + i}") for i, r in enumerate(raw[n:n + args.batch])]
        lineage = [Path(args.out) / arms[0] / f"batch-{t:03d}.patch" for t in range(args.batches)]
        return cost(arms[0], after, lineage, args)
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
    suite = close_neighbours(raw, args.batch, range(n, len(raw) - UNTOUCHED))
    close_records = [replace(edit_records[i], neighborhood_prompts=prompts,
                             neighborhood_true=edit_records[i].target_true) for i, prompts in suite.items()]
    (work / "close-neighbours-preserve.json").write_text(json.dumps(
        [{"prompt": p, "answer": " " + r.target_true} for r in close_records for p in r.neighborhood_prompts]))
    print(f"close-neighbour suite: {len(close_records)} edits of the first batch, "
          f"{sum(len(r.neighborhood_prompts) for r in close_records)} prompts")
    asked = {p for prompts in suite.values() for p in prompts}
    scored = {r["subject"] for r in untouched} | {r["subject"] for r in raw if r["prompt"] in asked}
    (work / "neighbour-subjects.json").write_text(json.dumps(sorted(
        {r["subject"] for r in raw[slice(*NEIGHBOUR_RECORDS)]} - scored)))

    ckpt = Checkpoint(args.model)
    model, tok = load_model(ckpt)
    scorer = TransformersScorer(model, tok, progress=False)
    budget = covariance_budget(tok, HELDOUT_DEFAULT)
    texts = [tok(t, truncation=True, max_length=256)["input_ids"] for t in heldout_texts(HELDOUT_DEFAULT)]
    unedited_file = work / "unedited.json"
    if not unedited_file.is_file():
        atomic_write(unedited_file, {"untouched_NS": measure_counterfact(scorer, untouched_records)["NS"],
                                     "close_NS": measure_counterfact(scorer, close_records)["NS"],
                                     "heldout_nll": nll(model, texts)})
    results = {"unedited": json.loads(unedited_file.read_text())}
    untouched_prompts = [r.rewrite_prompt for r in untouched_records]
    unrelated = (untouched_prompts, scorer.greedy(untouched_prompts, NEW_TOKENS))  # with the unedited model's
    patches: dict[str, list[Path]] = {arm: [] for arm in arms}
    for arm in arms:  # each arm's points in its own file: arms may run in parallel processes (one core each)
        results.update(_read(work / arm / "results.json"))
    for t in range(0 if not args.report_only else args.batches, args.batches):  # batch-major: every arm advances
        for arm in arms:
            path, seconds = batch_patch(arm, t, batches, args, budget, list(patches[arm]))
            patches[arm].append(path)
            key = f"{arm}/{t}"
            if key in results or (t + 1) % args.eval_every and t + 1 != args.batches:
                continue
            stack = [load_patch(path)] if arm == "onebatch" else [load_patch(p) for p in patches[arm]]
            unedited = merge_into_model(model, ckpt, stack)
            seen = edit_records[:(t + 1) * args.batch]
            tf = measure_counterfact(scorer, seen)
            results[key] = {"edits": len(seen), **{k: tf[k] for k in ("ES", "PS", "NS")},
                            **generated_view(scorer, seen, unrelated),
                            "untouched_NS": measure_counterfact(scorer, untouched_records)["NS"],
                            "close_NS": measure_counterfact(scorer, close_records)["NS"],
                            "heldout_nll": nll(model, texts),
                            "heldout_kl": scorer.heldout_kl(texts, partial(swapped, model, unedited))[0],
                            "make_seconds": seconds}
            for name, value in unedited.items():  # back to the base for the next point
                model.get_parameter(name).data.copy_(value)
            atomic_write(work / arm / "results.json", {k: v for k, v in results.items() if k.startswith(arm + "/")})
            shown = {k: v for k, v in results[key].items() if k != "edits" and v is not None}
            print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()), flush=True)

    base = results["unedited"]
    print(f"\nunedited: untouched NS {base['untouched_NS']:.3f}, held-out NLL {base['heldout_nll']:.3f}\n")
    cols = ["ES", "PS", "NS", "rewrite_hit", "paraphrase_hit", "untouched_NS", "unrelated_word_kept",
            "unrelated_kept", "close_NS", "heldout_nll", "heldout_kl"]
    print("| arm | edits | " + " | ".join(cols) + " | this batch's patch (s) | vs independent |\n|---|---|"
          + "---|" * (len(cols) + 2))
    for arm in arms:
        for t in range(args.batches):
            r = results.get(f"{arm}/{t}")
            if r:  # the seconds are those of the run that made the patch (None when a rerun found it)
                alone = results.get(f"independent/{t}", {}).get("make_seconds")
                ratio = f"{r['make_seconds'] / alone:.2f}x" if r.get("make_seconds") and alone else "-"
                seconds = f"{r['make_seconds']:.0f}" if r.get("make_seconds") else "-"
                scores = " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols)  # older runs: fewer
                print(f"| {arm} | {r['edits']} | {scores} | {seconds} | {ratio} |")
    if args.plot:
        plot(results, arms, args.batches, cols, base, args.plot)


def generated_view(scorer, seen: list, unrelated: tuple[list[str], list]) -> dict[str, float]:
    """eval --generate's view on the edits so far (greedy rewrite and paraphrase completions that start
    with the new target) and on the untouched records' rewrite prompts (first word and all tokens kept
    from the unedited model's completions, `unrelated`: (prompts, completions))."""
    tok = scorer.tokenizer
    hit_prompts = [p for r in seen for p in [r.rewrite_prompt, *r.paraphrase_prompts]]
    done = iter(scorer.greedy(hit_prompts, NEW_TOKENS))
    records = [GeneratedRecord(*[[(next(done), tuple(encode_pair(tok, p, r.target_new)[1])) for p in prompts]
                                 for prompts in ([r.rewrite_prompt], r.paraphrase_prompts)]) for r in seen]
    prompts, before = unrelated
    kept = kept_metrics([], list(zip(before, scorer.greedy(prompts, NEW_TOKENS))))
    return hit_metrics(records) | {k: kept[k] for k in ("unrelated_word_kept", "unrelated_kept")}


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def atomic_write(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1))


def plot(results, arms, batches, cols, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2))
    for ax, col in zip(axes, cols):
        for arm in arms:
            pts = [results[f"{arm}/{t}"] for t in range(batches) if f"{arm}/{t}" in results]
            pts = [p for p in pts if col in p]  # points of older runs lack the later columns
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
