"""`--preserve` files built from make-patch's default neighbours, for `bench/update_sweep.py`'s
"preserve_file" (issue 18, docs/hyperparameters.md "Session 28": what holds the unrelated prompts).

The neighbour prompts are make-patch's (each edit's prompt asked of the preset's names, SmolLM2's
`model:2000`, hparams.default_neighbours_per_edit per edit, seed --seed: preserve.neighbour_prompts), so a file without
answers holds exactly the keys the default preserves.

- `answers`: those prompts, and with each the model's own greedy answer of --answer-tokens tokens (the
  answer's keys are preserved too, as --preserve does with an "answer"; eval's greedy completions).
- `per-relation K`: each edit asked of max(per edit, ceil(K / the batch's edits of its relation)) names, so
  every relation the batch edits is held by at least K prompts; and the control: the same total spread
  evenly over the edits.

    .venv/bin/python bench/neighbour_files.py --edits 100 --out /work/benchout/ans28 answers
    .venv/bin/python bench/neighbour_files.py --edits 100 --out /work/benchout/ans28 per-relation 40
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

from memit_vllm.cache import cache_dir
from memit_vllm.checkpoint import Checkpoint, weights_sha256
from memit_vllm.core.files import atomic_file
from memit_vllm.core.records import load_requests
from memit_vllm.editor import default_hparams, load_editable
from memit_vllm.editor.arch import checkpoint_dims
from memit_vllm.editor.hparams import default_neighbours_per_edit
from memit_vllm.editor.preserve import generated_names, generated_subjects, neighbour_prompts
from memit_vllm.evaluate.scoring import TransformersScorer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=0))
    print(f"{path}: {len(rows)} prompts")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact_500.json"))
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="directory for the files")
    ap.add_argument("--answer-tokens", type=int, default=2)
    ap.add_argument("kind", choices=("answers", "per-relation"))
    ap.add_argument("k", nargs="?", type=int, default=40, help="per-relation: the prompts each relation gets at least")
    args = ap.parse_args()
    out = Path(args.out)

    ckpt = Checkpoint(args.model)
    tok, em = load_editable(ckpt)
    requests = load_requests(args.data, limit=args.edits)
    hp, _ = default_hparams(*checkpoint_dims(ckpt), n_edits=len(requests))
    kind = generated_subjects(hp.neighbour_subjects)  # the preset's: model:2000 for SmolLM2
    if kind is None:
        raise SystemExit(f"{args.model}'s defaults list no names to ask (neighbour_subjects {hp.neighbour_subjects})")
    names = generated_names(*kind, em.model, tok, args.seed, cache_dir(), weights_sha256(ckpt, cache_dir()))
    per_edit = default_neighbours_per_edit(len(requests))
    if args.kind == "answers":
        prompts = [p.prompt for p in neighbour_prompts(requests, names, per_edit, args.seed)]
        write(out / "names_only.json", [{"prompt": p} for p in prompts])
        answers = TransformersScorer(em.model, tok, progress=False).greedy(prompts, args.answer_tokens)
        write(out / "names_with_answers.json", [{"prompt": p, "answer": a.text if a.text.strip() else None}
                                                for p, a in zip(prompts, answers)])
        return
    relation = [r["requested_rewrite"]["relation_id"] for r in json.loads(Path(args.data).read_text())[:len(requests)]]
    edits_of = Counter(relation)
    pool = sorted(set(names) - {r.subject for r in requests})
    counts = [max(per_edit, math.ceil(args.k / edits_of[x])) for x in relation]
    rnd = random.Random(args.seed)
    rows = [{"prompt": replace(r, subject=s).text()} for r, n in zip(requests, counts) for s in rnd.sample(pool, n)]
    write(out / f"per_relation_{args.k}.json", rows)
    even = round(len(rows) / len(requests))
    rnd = random.Random(args.seed)
    write(out / f"even_{even}.json", [{"prompt": replace(r, subject=s).text()} for r in requests
                                      for s in rnd.sample(pool, even)])


if __name__ == "__main__":
    main()
