"""Token conventions shared by the editor and the scorer (MEMIT's, see memit-reference.md section 3).

- A prompt is tokenized as the model sees it (the tokenizer's BOS included).
- A target is tokenized on its own, without special tokens, and a BOS the tokenizer still prepends is
  dropped, so it can be appended to any prompt's ids.
- Batches are right-padded with the tokenizer's pad id, else its EOS id (many Llama tokenizers have
  no pad token), else 0; the attention mask hides the padding either way.
"""

from __future__ import annotations


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
