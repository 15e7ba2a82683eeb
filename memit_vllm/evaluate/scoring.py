"""Teacher-forced target scoring and greedy generation on a transformers model.

A target is scored after its prompt by feeding prompt ids + target ids as one sequence. Prompt and
target are tokenized separately and the ids concatenated, so the target's token boundaries are the
same whatever the prompt ends with (the MEMIT convention; see core.tokens). Many sequences go in one
forward, right padded: positions then count from 0 in every row, and the target's logits sit at
fixed offsets.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..core.tokens import pad_id, pad_right, target_ids
from ..errors import MemitError
from .metrics import KL_TOP_K, Completion, topk_kl


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
        def batch_texts(batch: list[str]) -> list[str]:
            return [p + c.text for p, c in zip(batch, self._greedy_batch(batch, max_new_tokens, margins=False))]

        return map_batched(prompts, self.batch_size, self._bar(len(set(prompts)), desc), batch_texts)

    @torch.no_grad()
    def greedy(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "greedy") -> list[Completion]:
        """Greedy completions (tokens, text, first-token margin), in batches of similar prompt length."""
        return map_batched(prompts, self.batch_size, self._bar(len(set(prompts)), desc),
                           lambda batch: self._greedy_batch(batch, max_new_tokens),
                           key=lambda p: len(self.tokenizer(p)["input_ids"]))

    def _greedy_batch(self, batch: list[str], max_new_tokens: int, margins: bool = True) -> list[Completion]:
        """`margins=False` (margin NaN) keeps no per-step logits: long generations would hold vocab x steps."""
        encoded = [self.tokenizer(p)["input_ids"] for p in batch]
        width = max(map(len, encoded))
        # Left padding here: generation appends at the right end of every row.
        ids = torch.tensor([[self.pad_id] * (width - len(e)) + e for e in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=self.pad_id,
                                  output_logits=margins, return_dict_in_generate=True)
        top2 = (torch.softmax(out.logits[0].float(), -1).topk(2, -1).values.tolist() if margins
                else [(math.nan, math.nan)] * len(batch))
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [self.tokenizer.eos_token_id if eos is None else eos])
        completions = []
        for seq, (p1, p2) in zip(out.sequences[:, width:].tolist(), top2):
            # generate pads a row after its EOS; a served completion ends with that EOS.
            seq = seq[:next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))]
            completions.append(Completion(tuple(seq), self.tokenizer.decode(seq, skip_special_tokens=True), p1 - p2))
        return completions

    @torch.no_grad()
    def heldout_kl(self, texts: Sequence[list[int]], reference, k: int = KL_TOP_K,
                   batch_size: int = 4) -> tuple[float, float]:
        """Mean over the next-token positions of `texts` (token ids) of KL(P_ref || P_model): exact, and by
        `metrics.topk_kl` from the two top-k lists (what a server can return). `reference()` is a context
        in which the model is the reference (the unedited weights swapped in)."""
        exact, estimate, positions = 0.0, 0.0, 0
        with self._bar(len(texts), "held-out KL") as bar:
            for start in range(0, len(texts), batch_size):
                batch = texts[start:start + batch_size]
                ids, mask = pad_right(batch, self.pad_id)
                ids, mask = ids.to(self.device), mask.to(self.device)
                logq = self._next_token_logprobs(ids, mask)
                with reference():
                    logp = self._next_token_logprobs(ids, mask)
                real = mask[:, 1:].bool()  # position j predicts token j + 1
                logp, logq = logp[real], logq[real]
                exact += (logp.exp() * (logp - logq)).sum().item()
                tops = [torch.topk(x, k, -1) for x in (logp, logq)]
                (pv, pi), (qv, qi) = [(t.values.tolist(), t.indices.tolist()) for t in tops]
                estimate += sum(topk_kl(dict(zip(pi[j], pv[j])), dict(zip(qi[j], qv[j]))) for j in range(len(pv)))
                positions += len(pv)
                bar.update(len(batch))
        return exact / positions, estimate / positions

    def _next_token_logprobs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
