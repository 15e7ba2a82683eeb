"""Both views of one batch of edits, to choose make-patch's defaults by (issue 18): the teacher-forced
scores (ES / PS / NS) and the generated ones (`eval --generate`: rewrite and paraphrase completions that
start with the new target, neighbour and unrelated completions kept, held-out next-token KL).

    .venv/bin/python bench/drift.py [--edits 100] [--layers 3-9] [--lambda 768] [--hparams '{"clamp_norm_factor": 2}']
                                    [--new-tokens 8] [--unrelated FILE] [--heldout FILE] [--json drift.json]
    .venv/bin/python bench/drift.py --patch facts.patch [--patch more.patch] --edits N ...

Without --patch it makes one patch of the first --edits records of --data (CounterFact), with the
preset and the given overrides, its covariance from the project corpus minus the held-out slice the
KL reads (generation.covariance_budget: one corpus pass the first time, minutes on 2 CPU cores, then
cached; --whole-corpus skips it and says the KL text is not held out), and times it. Either way it
evaluates the first --edits records before and after, prints the table and a one-line summary, and
writes the JSON: the settings, make-patch's report and `eval`'s full result (README "Evaluation").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from make_patch import CORPUS, DATA, machine

from memit_vllm.checkpoint import Checkpoint

SUMMARY = ("ES", "PS", "NS", "rewrite_hit", "paraphrase_hit", "neighbour_word_kept", "unrelated_word_kept",
           "unrelated_word_kept_confident", "unrelated_kept", "heldout_kl")


def make(args, model_dir, out: Path) -> tuple[Path, dict]:
    """One patch of the first --edits records; its path and what make-patch reported."""
    from transformers import AutoTokenizer

    from memit_vllm.editor import edit, load_requests, parse_layers
    from memit_vllm.evaluate.generation import covariance_budget

    requests = load_requests(args.data, limit=args.edits)
    budget = None if args.whole_corpus else covariance_budget(AutoTokenizer.from_pretrained(model_dir), CORPUS)
    t = time.perf_counter()
    result = edit(model_dir, requests, hparams=json.loads(args.hparams) if args.hparams else None,
                  layers=parse_layers(args.layers), mom2_update_weight=args.lam, stats_corpus=str(CORPUS),
                  stats_tokens=budget, device=args.device, progress=sys.stderr.isatty(), name="drift")
    seconds = time.perf_counter() - t
    path = result.patch.save(out / "drift.patch")
    r = result.report
    return path, {"seconds": round(seconds, 1), "hparams": result.patch.hparams, "stats_tokens": budget,
                  "z_target_prob": r.z_target_prob, "z_steps": r.z_steps, "delivered": r.delivered,
                  "warnings": r.warnings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact_500.json"))
    ap.add_argument("--edits", type=int, default=100, help="edit (and evaluate) the first N records")
    ap.add_argument("--patch", action="append", default=[], help="evaluate this patch instead of making one")
    ap.add_argument("--layers", default=None)
    ap.add_argument("--lambda", dest="lam", type=float, default=None)
    ap.add_argument("--hparams", default=None, help="JSON object of hyperparameter overrides")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--unrelated", default=None)
    ap.add_argument("--heldout", default=None)
    ap.add_argument("--whole-corpus", action="store_true", help="covariance from the whole corpus (make-patch's "
                    "default, usually cached): quicker, but the KL text is then no longer held out")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default="drift.json")
    args = ap.parse_args()

    from memit_vllm.evaluate.report import format_table
    from memit_vllm.evaluate.run import evaluate

    model_dir = Checkpoint(args.model).path
    with tempfile.TemporaryDirectory() as tmp:
        if args.patch:
            patches, made = args.patch, None
        else:
            path, made = make(args, model_dir, Path(tmp))
            patches = [path]
        t = time.perf_counter()
        result = evaluate(str(model_dir), args.data, patches, n=args.edits, generate=True,
                          new_tokens=args.new_tokens, unrelated=args.unrelated, heldout=args.heldout,
                          device=args.device, progress=sys.stderr.isatty())
    settings = {k: v for k, v in vars(args).items() if k not in ("json",)}
    report = {"machine": machine(), "settings": settings, "make_patch": made,
              "eval_seconds": round(time.perf_counter() - t, 1), "eval": result}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(result))
    after = result["after"]
    print("| " + " | ".join(SUMMARY) + " |\n|" + "---|" * len(SUMMARY))
    print("| " + " | ".join(f"{after[k]:.3g}" if k in after else "-" for k in SUMMARY) + " |")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
