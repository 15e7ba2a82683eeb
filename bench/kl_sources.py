"""Where a patch's held-out KL sits (issue 18): how it spreads over the held-out positions, the tokens
that carry most of it, and per edited layer how loud the update is on ordinary text and how much of
that is the update of the corpus-mean key.

The held-out texts are `eval --generate`'s (the last texts of the corpus; the sweeps' statistics leave
them out). KL(unedited || edited) of the next-token distribution at every position, in float64.

    .venv/bin/python bench/kl_sources.py PATCH [PATCH ...] [--model smollm2-135m] [--top 25]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from memit_vllm.checkpoint import Checkpoint, resolve_model_path
from memit_vllm.core.tokens import pad_id, pad_right
from memit_vllm.editor import load_editable
from memit_vllm.editor.covariance import MAX_SEQ, file_corpus, token_batches
from memit_vllm.editor.trace import capture
from memit_vllm.evaluate.generation import HELDOUT_DEFAULT, heldout_texts
from memit_vllm.evaluate.patching import load_model, merge_into_model
from memit_vllm.patch import load_patch

SHARES = (0.01, 0.05, 0.10, 0.25)
LAYER_TOKENS = 4096  # corpus tokens for the per-layer figures


@torch.no_grad()
def position_kl(ckpt: Checkpoint, patches) -> tuple[torch.Tensor, list[str]]:
    """KL at every held-out position, and the last four tokens up to each (what the model had just read)."""
    base, tok = load_model(ckpt)
    edited, _ = load_model(ckpt)
    merge_into_model(edited, ckpt, patches)
    kls, where = [], []
    for text in heldout_texts(HELDOUT_DEFAULT):
        ids = tok(text, return_tensors="pt", truncation=True, max_length=MAX_SEQ)["input_ids"]
        p = F.log_softmax(base(ids).logits[0].double(), -1)
        q = F.log_softmax(edited(ids).logits[0].double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
        where += [tok.decode(ids[0, max(0, i - 3):i + 1]) for i in range(ids.shape[1])]
    return torch.cat(kls), where


@torch.no_grad()
def layer_loudness(ckpt: Checkpoint, patches) -> list[tuple[int, float, float]]:
    """Per patched layer: E|Delta k|^2 over the first corpus tokens (keys of the base model, deltas of all
    patches summed, taken to the model layout: to_checkpoint_layout is its own inverse), and the share of
    it that |Delta m|^2 is, m the mean key."""
    tok, em = load_editable(ckpt)
    layers = sorted({em.arch.layer_of(n) for p in patches for n in p.deltas})
    ids, mask = pad_right(next(token_batches(tok, file_corpus(HELDOUT_DEFAULT), LAYER_TOKENS)), pad_id(tok))
    got = capture(em, ids, mask, keys=layers)
    rows = []
    for layer in layers:
        k = got.keys[layer][mask.bool()].double()
        name = em.param_name(layer)
        delta = em.to_checkpoint_layout(sum(p.deltas[name].double() for p in patches if name in p.deltas))
        loud = float((k @ delta.T).pow(2).sum(1).mean())
        rows.append((layer, loud, float((delta @ k.mean(0)).pow(2).sum()) / loud))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patches", nargs="+")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--top", type=int, default=25, help="positions listed")
    args = parser.parse_args()
    ckpt = Checkpoint(resolve_model_path(args.model))
    patches = [load_patch(p) for p in args.patches]
    kl, where = position_kl(ckpt, patches)
    ranked, order = kl.sort(descending=True)
    print(f"{len(kl)} positions: mean KL {kl.mean():.4f}, median {kl.median():.4f}")
    for share in SHARES:
        print(f"the top {share:.0%} of positions hold {ranked[:int(share * len(kl))].sum() / ranked.sum():.1%}")
    for i in order[:args.top].tolist():
        print(f"{float(kl[i]):.3f} {where[i]!r}")
    print("| layer | E|Delta k|^2 | mean key's share |\n|---|---|---|")
    for layer, loud, share in layer_loudness(ckpt, patches):
        print(f"| {layer} | {loud:.2f} | {share:.2%} |")


if __name__ == "__main__":
    main()
