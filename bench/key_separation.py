"""Which layers tell one subject from another (issue 18: where drift on unrelated prompts comes from).

An update that writes residual r at an edit's key k_i moves the output at any other key k by

    leak(k) = k_i^T C^-1 k / k_i^T C^-1 k_i     (times r; C the layer's key covariance)

for a single edit solved as MEMIT solves it (lambda cancels). This prints, per layer, the mean leak of
each edit onto the same prompt asked of other subjects ("neighbours": the unrelated prompts that flip,
docs/hyperparameters.md "Drift") and onto the other edits' keys (other subjects and mostly other
relations). A layer whose neighbour leak is small edits the subject, not the relation.

    .venv/bin/python bench/key_separation.py [--edits 100] [--per-edit 5] [--layers 0-23] [--tokens 30000]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import torch

from memit_vllm.cache import cache_dir
from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.records import load_requests, read_dataset
from memit_vllm.editor import EditConfig, default_hparams, load_editable, parse_layers
from memit_vllm.editor.arch import checkpoint_dims
from memit_vllm.editor.memit import KeyReader, statistics
from memit_vllm.editor.prompts import context_templates

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPUS = DATA / "corpus" / "smollm2_self_2k.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact_500.json"))
    ap.add_argument("--pool", default=str(DATA / "counterfact" / "counterfact_edit_10k.json"),
                    help="other subjects: those of records 2000-4000 of this file")
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--per-edit", type=int, default=5)
    ap.add_argument("--layers", default="0-23")
    ap.add_argument("--tokens", type=int, default=30000, help="covariance token budget")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ckpt = Checkpoint(args.model)
    tok, em = load_editable(ckpt)
    hp, _ = default_hparams(*checkpoint_dims(ckpt))
    layers = parse_layers(args.layers)
    requests = load_requests(args.data, limit=args.edits)
    _, pool = read_dataset(args.pool, 4000)
    edited = {r.subject for r in requests}
    subjects = sorted({r.subject for r in pool[2000:]} - edited)
    rnd = random.Random(args.seed)
    neighbours = [replace(r, subject=s) for r in requests for s in rnd.sample(subjects, args.per_edit)]
    torch.manual_seed(args.seed)
    groups = context_templates(em.model, tok, hp.context_template_seeds, hp.context_template_length, args.seed)
    config = EditConfig(stats_corpus=str(CORPUS), stats_tokens=args.tokens, seed=args.seed)
    stats = statistics(em, tok, ckpt, hp.replace(layers=layers, mom2_n_tokens=args.tokens), config, cache_dir())
    edits_r, neigh_r = KeyReader(em, tok, requests, groups), KeyReader(em, tok, neighbours, groups)
    n = len(requests)
    print(f"{n} edits of {args.data}, {args.per_edit} neighbours each; C over {args.tokens} tokens")
    print("| layer | neighbour leak (mean) | share of neighbours with leak > 0.5 | other edits' leak (mean) |")
    print("|---|---|---|---|")
    for layer in layers:
        K = edits_r.read(layer, None)[0].double()  # [n, d_ff]
        N = neigh_r.read(layer, None)[0].double().view(n, args.per_edit, -1)
        W = torch.linalg.solve(stats.covs[layer].double(), K.T).T  # C^-1 k_i, rows
        self_ = (W * K).sum(-1)  # k_i^T C^-1 k_i
        leak_n = torch.einsum("nd,npd->np", W, N) / self_[:, None]
        leak_o = (W @ K.T) / self_[:, None]
        off = leak_o[~torch.eye(n, dtype=torch.bool)]
        print(f"| {layer} | {leak_n.mean():.3f} | {(leak_n > 0.5).float().mean():.2f} | {off.mean():.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
