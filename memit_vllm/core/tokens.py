"""Token conventions shared by the editor and the scorer (MEMIT's, see memit-reference.md section 3).

- A prompt is tokenized as the model sees it (the tokenizer's BOS included).
- A target is tokenized on its own, without special tokens, and a BOS the tokenizer still prepends is
  dropped, so it can be appended to any prompt's ids.
- Batches are right-padded with the tokenizer's pad id, else its EOS id (many Llama tokenizers have
  no pad token), else 0; the attention mask hides the padding either way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a function needs it
    import torch


def pad_id(tok) -> int:
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id if tok.eos_token_id is not None else 0


def ensure_pad_token(tok) -> None:
    """Give a tokenizer without a pad token its EOS as pad (batched generation pads)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def target_ids(tok, target: str) -> list[int]:
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if ids and tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    return ids


def pad_right(seqs: list[list[int]], pad: int):
    """(ids, attention mask) as [len(seqs), longest] long tensors, right-padded with `pad`."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# The default of what one more padded call costs beyond its tokens, in row-tokens (each call streams the
# weights of the layers it runs and adds Python/autograd work). Measured for the z loop's forward+backward:
# batched z on 16 CounterFact edits, SmolLM2, 2 CPU cores (bench/make_patch.py z-speed --edits 16
# --group-costs 64,0,32,128,1e9): 64 -> 55.0 s, 0 -> 67.9, 32 -> 59.1, 128 -> 57.0, one group -> 65.1.
# The key reads (forward only) take the same value.
BUCKET_OVERHEAD_TOKENS = 64


def length_buckets(lengths: torch.Tensor, overhead: float) -> list[torch.Tensor]:
    """Indices of `lengths` grouped into contiguous length ranges, each run as one batch padded to its
    longest: the grouping that minimises padded tokens + `overhead` per group (exact, by dynamic
    programming over the distinct lengths, which are few)."""
    values, counts = (x.tolist() for x in lengths.unique(return_counts=True))
    best, cut = [0.0] + [math.inf] * len(values), [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        rows = 0
        for i in range(j, 0, -1):  # group = distinct lengths i..j (1-based)
            rows += counts[i - 1]
            cost = best[i - 1] + rows * values[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups, j = [], len(values)
    while j:
        lo, hi = values[cut[j]], values[j - 1]
        groups.append(((lengths >= lo) & (lengths <= hi)).nonzero().squeeze(1))
        j = cut[j]
    return groups[::-1]


def length_batches(lengths: torch.Tensor, max_rows: int, overhead: float) -> list[torch.Tensor]:
    """Indices of `lengths` in batches of at most `max_rows` rows of similar length (`length_buckets`, each
    bucket cut in order): a batch in request order pads every row to its longest (docs/benchmarks.md,
    "Session 24": the key reads of 1,000 edits 1.73x faster this way)."""
    return [bucket[start:start + max_rows] for bucket in length_buckets(lengths, overhead)
            for start in range(0, len(bucket), max_rows)]
