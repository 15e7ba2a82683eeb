"""Teacher-forced target scoring and greedy generation on a transformers model.

A target is scored after its prompt by feeding prompt ids + target ids as one sequence. Prompt and
target are tokenized separately and the ids concatenated, so the target's token boundaries are the
same whatever the prompt ends with (the MEMIT convention; see core.tokens). Many sequences go in one
forward, right padded: positions then count from 0 in every row, and the target's logits sit at
fixed offsets.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..core.tokens import pad_id, pad_right, target_ids
from ..errors import MemitError


@dataclass(frozen=True)
class TargetScore:
    nll: float  # mean per-token negative log-likelihood of the target
    acc: float  # fraction of target tokens that are the top-1 prediction (teacher forced)


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with the BOS the tokenizer adds, if any) and ids of " " + target (never a BOS)."""
    prompt_ids, ids = tokenizer(prompt)["input_ids"], target_ids(tokenizer, " " + target)
    if not prompt_ids or not ids:
        raise MemitError(f"prompt {prompt!r} / target {target!r}: one of them tokenizes to nothing, "
                         "so it cannot be scored; fix or drop the record")
    return prompt_ids, ids


def map_batched(items: Sequence, batch_size: int, bar, fn: Callable[[list], list], key=None) -> list:
    """`fn` over the distinct items (repeats are common: shared neighbour prompts), `batch_size` at a
    time in `key` order, ticking `bar`; results come back in the order and multiplicity of `items`."""
    unique = sorted(dict.fromkeys(items), key=key) if key else list(dict.fromkeys(items))
    results = {}
    with bar:
        for start in range(0, len(unique), batch_size):
            batch = unique[start:start + batch_size]
            results.update(zip(batch, fn(batch)))
            bar.update(len(batch))
    return [results[i] for i in items]


class TransformersScorer:
    """Scores (prompt, target) pairs with an in-memory HF causal LM, fp32, no grad, batched."""

    def __init__(self, model, tokenizer, batch_size: int = 16, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.pad_id = pad_id(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, file=sys.stderr, leave=False)

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[str, str]], desc: str = "scoring") -> list[TargetScore]:
        encoded = {pair: encode_pair(self.tokenizer, *pair) for pair in pairs}
        # Longest first: rows of similar length share a batch, so little padding is computed.
        return map_batched(pairs, self.batch_size, self._bar(len(encoded), desc),
                           lambda batch: self._score_batch([encoded[p] for p in batch]),
                           key=lambda pair: -sum(map(len, encoded[pair])))

    def _score_batch(self, encoded: list[tuple[list[int], list[int]]]) -> list[TargetScore]:
        ids, mask = pad_right([p + t for p, t in encoded], self.pad_id)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        out = []
        for row, (p, t) in enumerate(encoded):
            # Logits at position j predict token j+1: the target's tokens are predicted from p-1 .. p+len(t)-2.
            step = logits[row, len(p) - 1:len(p) + len(t) - 1].float()
            target = torch.tensor(t, device=step.device)
            logp = torch.log_softmax(step, dim=-1).gather(1, target[:, None])[:, 0]
            out.append(TargetScore(nll=-logp.mean().item(), acc=(step.argmax(-1) == target).float().mean().item()))
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 100, desc: str = "generating") -> list[str]:
        """Greedy continuations, returned with their prompt (the text the MEMIT code measures)."""
        return map_batched(prompts, self.batch_size, self._bar(len(set(prompts)), desc),
                           lambda batch: self._generate_batch(batch, max_new_tokens))

    def _generate_batch(self, batch: list[str], max_new_tokens: int) -> list[str]:
        encoded = [self.tokenizer(p)["input_ids"] for p in batch]
        width = max(map(len, encoded))
        # Left padding here: generation appends at the right end of every row.
        ids = torch.tensor([[self.pad_id] * (width - len(e)) + e for e in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=self.pad_id)
        return [p + self.tokenizer.decode(seq[width:], skip_special_tokens=True) for p, seq in zip(batch, out)]
