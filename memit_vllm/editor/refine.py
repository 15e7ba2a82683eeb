"""The edited layers' deltas refined together on the model's outputs (hparams refine_steps; 0: off).

MEMIT solves each layer alone against a second-order proxy of what it disturbs (lambda C, the preserved
keys); the layers' disturbances compound on the way up, and no per-layer term sees that: on SmolLM2 it is
most of the held-out KL of a patch (docs/hyperparameters.md, "Session 23"). Here the solved deltas take a
few Adam steps together on

    CE of each edit's new target after its prompt
    + w_n * KL(unedited || edited) of the next token after the preserved prompts
      (--preserve and the neighbour subjects' prompts: other subjects asked the edits' relations; with
      refine_neighbour_tokens N > 1 also at each of the unedited model's first N - 1 greedy tokens after them)
    + w_c * KL(unedited || edited) at every position of statistics-corpus texts

Each weight is relative to the batch: w_n makes the preserved prompts' KL weigh refine_neighbour_weight times
the edits' CE before the first step, w_c the corpus KL refine_corpus_weight times. The balance the steps need
does not move with the batch's size, the terms do (SmolLM2: at 1,000 edits both KLs are ~15x their 100-edit
values and the CE 2.5x; absolute weights right at 100 edits undid a sixth of the rewrites at 1,000).

"Unedited" is the model this patch is made on (its stack merged): the deltas switched off. Every step draws
its rows afresh from seeded pools (a fixed set of texts is fitted, not kept: "Session 30"), and the corpus
pool holds only texts the covariance read (its token budget), never what follows (eval's held-out slice).
The deltas, their Adam state and the losses are fp32; the forward runs in the model's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.records import EditRequest
from ..core.tokens import BUCKET_OVERHEAD_TOKENS, length_batches, pad_id, pad_right, target_ids
from .arch import EditableModel
from .covariance import Corpus, token_batches
from .hparams import HParams
from .prompts import encode

# Rows per step (drawn from the pools) and per forward; at 100 edits every edit is in every step.
STEP_EDITS = 256
STEP_PROMPTS = 256
STEP_TEXTS = 16
TEXT_TOKENS = 64  # each corpus text's first tokens (texts shorter than this are skipped)
TEXT_POOL = 512  # the corpus texts drawn from: the first ones the covariance read
# Preserved prompts whose unedited next-token distributions are kept (a vocabulary of floats each: 0.2 GB
# per 1,000 on SmolLM2); more than this are sampled once (seeded).
PROMPT_POOL = 2048
FORWARD_ROWS = 64


@dataclass
class Losses:
    edits: float  # the edits' mean CE (each edit's: the mean over its new target's tokens)
    neighbours: float  # mean KL per counted position of the preserved prompts (0 without any)
    corpus: float  # mean KL per corpus position

    def to_dict(self) -> dict:
        return {"edit_ce": self.edits, "kl_neighbours": self.neighbours, "kl_corpus": self.corpus}


class DeltaTerms:
    """Each edited down-projection's output plus x D^T, D a trainable fp32 [d_model, d_ff] per layer (so
    Conv1D and Linear alike); `off()` gives the model without them."""

    def __init__(self, em: EditableModel, deltas: dict[int, torch.Tensor]):
        self.params = {l: torch.nn.Parameter(d.to(em.device_of(l), torch.float32).clone()) for l, d in deltas.items()}
        self.on = True
        self.handles = [em.down_proj(l).register_forward_hook(self._hook(l)) for l in deltas]

    def _hook(self, layer: int):
        def add(module, args, out):
            return out + F.linear(args[0].float(), self.params[layer]).to(out.dtype) if self.on else out
        return add

    @contextmanager
    def off(self):
        self.on = False
        try:
            with torch.no_grad():
                yield
        finally:
            self.on = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _kl(base: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Summed KL(base || edited) over rows of log-probabilities."""
    return (base.exp() * (base - edited)).sum()


class Refiner:
    """The three terms' rows, tokenised once, and the unedited distributions that cannot change. Rows are
    read in batches of similar length (`overhead_tokens`: length_batches' cost of one more forward; inf reads
    them in drawn order)."""

    def __init__(self, em: EditableModel, tok, hp: HParams, requests: list[EditRequest], prompts: list[str],
                 corpus: Corpus | None, seed: int, overhead_tokens: float = BUCKET_OVERHEAD_TOKENS):
        self.em, self.hp, self.pad, self.overhead = em, hp, pad_id(tok), overhead_tokens
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.edits = []  # (prompt + target ids, target ids)
        for r in requests:
            new = target_ids(tok, r.target_new)
            self.edits.append((encode(tok, "{}", r).ids + new[:-1], new))
        self.prompts = [tok(p)["input_ids"] for p in prompts] if hp.refine_neighbour_weight else []
        if len(self.prompts) > PROMPT_POOL:
            keep = torch.randperm(len(self.prompts), generator=self.gen)[:PROMPT_POOL].sort().values.tolist()
            self.prompts = [self.prompts[i] for i in keep]
        self.texts = _text_pool(tok, corpus, hp.mom2_n_tokens) if corpus is not None and hp.refine_corpus_weight \
            else []
        eos = em.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [tok.eos_token_id if eos is None else eos])
        self.tails = [1] * len(self.prompts)  # per preserved row: its last positions whose next token counts
        self.unedited_prompts = None  # their unedited distributions, when kept (one position per row)
        self.weights = (0.0, 0.0)  # w_n, w_c (prepare)

    def _draw(self, n: int, size: int) -> list[int]:
        return torch.randperm(n, generator=self.gen)[:size].tolist() if n > size else list(range(n))

    def _hidden(self, seqs: list[list[int]]):
        ids, mask = pad_right(seqs, self.pad)
        return self.em.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.em.logits(hidden.to(self.em.output_device)).float(), -1)

    def _tail_logprobs(self, seqs: list[list[int]], tails: list[int]) -> torch.Tensor:
        """Next-token log-probabilities at the last `tails[r]` positions of each row r, rows concatenated."""
        hidden = self._hidden(seqs)
        rows, cols = zip(*[(r, len(s) - t + k) for r, (s, t) in enumerate(zip(seqs, tails)) for k in range(t)])
        return self._logprobs(hidden[list(rows), list(cols)])

    def _text_logprobs(self, texts: list[list[int]]) -> torch.Tensor:
        return self._logprobs(self._hidden(texts)).flatten(0, 1)

    def prepare(self, terms: DeltaTerms) -> None:
        """What cannot change, read once: the preserved prompts' next-token distributions without the deltas;
        and the KLs' weights, from the three terms before the first step (on one draw of each)."""
        if self.hp.refine_neighbour_tokens > 1:
            self._continue(terms, self.hp.refine_neighbour_tokens - 1)
        else:  # one position per row: kept (a vocabulary of floats each), not read again every step
            lengths = torch.tensor([len(p) for p in self.prompts], dtype=torch.long)
            with terms.off():
                for part in length_batches(lengths, FORWARD_ROWS, self.overhead):
                    read = self._tail_logprobs([self.prompts[i] for i in part.tolist()], [1] * len(part))
                    if self.unedited_prompts is None:
                        self.unedited_prompts = read.new_empty(len(self.prompts), read.shape[1])
                    self.unedited_prompts[part.to(read.device)] = read
        with torch.no_grad():
            ce, kl_n, kl_c = self._terms(terms, backward=False)
        hp = self.hp
        self.weights = (hp.refine_neighbour_weight * ce / kl_n if kl_n > 0 else 0.0,
                        hp.refine_corpus_weight * ce / kl_c if kl_c > 0 else 0.0)

    def _continue(self, terms: DeltaTerms, new_tokens: int) -> None:
        """Each preserved prompt followed by the unedited model's greedy continuation (up to `new_tokens`,
        ending before an end-of-sequence token): the positions a whole generated answer is read at."""
        model, eos = self.em.model, self.eos
        lengths = torch.tensor([len(p) for p in self.prompts], dtype=torch.long)
        with terms.off():
            for part in length_batches(lengths, FORWARD_ROWS, self.overhead):
                seqs = [self.prompts[i] for i in part.tolist()]
                width = max(map(len, seqs))
                # left padding: generation appends at the right end of every row
                ids = torch.tensor([[self.pad] * (width - len(s)) + s for s in seqs])
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                     temperature=None, top_p=None, top_k=None, pad_token_id=self.pad)
                for i, s, new in zip(part.tolist(), seqs, out[:, width:].tolist()):
                    new = new[:next((k for k, t in enumerate(new) if t in eos), len(new))]
                    self.prompts[i], self.tails[i] = s + new, 1 + len(new)

    def step(self, terms: DeltaTerms) -> Losses:
        """One step's gradients (added to the deltas' .grad), forward by forward so that memory holds one
        forward's graph; returns the step's losses (before it moves the deltas)."""
        return Losses(*self._terms(terms, backward=True))

    def _terms(self, terms: DeltaTerms, backward: bool) -> tuple[float, float, float]:
        """The three terms on a fresh draw of rows (their weighted gradients accumulated when `backward`)."""
        w_n, w_c = self.weights if backward else (1.0, 1.0)
        edits = self._draw(len(self.edits), STEP_EDITS)
        ce = self._accumulate(edits, [len(self.edits[i][0]) for i in edits],
                              lambda picked: self._edit_ces(picked).sum(), 1.0, len(edits), backward)
        prompts = self._draw(len(self.prompts), STEP_PROMPTS)
        kl_n = self._accumulate(prompts, [len(self.prompts[i]) for i in prompts], partial(self._prompt_kl, terms),
                                w_n, sum(self.tails[i] for i in prompts), backward)
        texts = self._draw(len(self.texts), STEP_TEXTS)
        kl_c = self._accumulate(texts, [TEXT_TOKENS] * len(texts), partial(self._text_kl, terms), w_c,
                                len(texts) * TEXT_TOKENS, backward)
        return ce, kl_n, kl_c

    def _accumulate(self, picked: list[int], lengths: list[int], summed_loss, weight: float, count: int,
                    backward: bool) -> float:
        """The mean of `summed_loss` over `count` rows of `picked` (token `lengths`), forward by forward of
        rows of similar length (`length_batches`: drawn order pads every row to the longest, ~2x the tokens
        of CounterFact prompts); with `backward` its gradient times `weight` accumulated (nothing is read at
        weight 0)."""
        total = 0.0
        if not weight or not picked:
            return total
        for part in length_batches(torch.tensor(lengths), FORWARD_ROWS, self.overhead):
            loss = summed_loss([picked[i] for i in part.tolist()]) / count
            if backward:
                (weight * loss).backward()
            total += float(loss.detach())
        return total

    def _edit_ces(self, picked: list[int]) -> torch.Tensor:
        """Each of the edits `picked`: the mean CE of its new target's tokens."""
        rows = [self.edits[i] for i in picked]
        hidden = self._hidden([s for s, _ in rows])
        i, j = zip(*[(r, len(s) - len(t) + k) for r, (s, t) in enumerate(rows) for k in range(len(t))])
        logits = self.em.logits(hidden[list(i), list(j)].to(self.em.output_device)).float()
        wanted = torch.tensor([x for _, t in rows for x in t], device=logits.device)
        ce = F.cross_entropy(logits, wanted, reduction="none")
        row = torch.tensor(i, device=ce.device)
        return torch.zeros(len(rows), device=ce.device).index_add(0, row, ce) / torch.bincount(row, minlength=len(rows))

    def _prompt_kl(self, terms: DeltaTerms, picked: list[int]) -> torch.Tensor:
        seqs, tails = [self.prompts[i] for i in picked], [self.tails[i] for i in picked]
        if self.unedited_prompts is not None:
            base = self.unedited_prompts[torch.tensor(picked, device=self.unedited_prompts.device)]
        else:
            with terms.off():
                base = self._tail_logprobs(seqs, tails)
        return _kl(base, self._tail_logprobs(seqs, tails))

    def _text_kl(self, terms: DeltaTerms, picked: list[int]) -> torch.Tensor:
        texts = [self.texts[i] for i in picked]
        with terms.off():
            base = self._text_logprobs(texts)
        return _kl(base, self._text_logprobs(texts))


def _text_pool(tok, corpus: Corpus, budget: int | None) -> list[list[int]]:
    """The first TEXT_TOKENS tokens of the first TEXT_POOL texts that hold as many, as the covariance read
    them (covariance.token_batches: its truncation and token budget): never what follows them."""
    pool = []
    for batch in token_batches(tok, corpus, budget):
        pool += [ids[:TEXT_TOKENS] for ids in batch if len(ids) >= TEXT_TOKENS][:TEXT_POOL - len(pool)]
        if len(pool) == TEXT_POOL:
            break
    return pool


def refine(em: EditableModel, tok, hp: HParams, requests: list[EditRequest], deltas: dict[int, torch.Tensor],
           prompts: list[str], corpus: Corpus | None, seed: int, progress: bool = True
           ) -> tuple[dict[int, torch.Tensor], dict]:
    """`deltas` (layer -> [d_model, d_ff], on a model that has none of them merged) after hp.refine_steps
    Adam steps, and a report: the losses of the first and the last step, the rows the pools hold."""
    refiner = Refiner(em, tok, hp, requests, prompts, corpus, seed)
    terms = DeltaTerms(em, deltas)
    try:
        refiner.prepare(terms)
        opt = torch.optim.Adam(terms.params.values(), lr=hp.refine_lr)
        first = last = None
        bar = tqdm(range(hp.refine_steps), desc="refine", disable=not progress)
        for _ in bar:
            opt.zero_grad()
            last = refiner.step(terms)
            first = last if first is None else first
            bar.set_postfix(ce=f"{last.edits:.3f}", kl_n=f"{last.neighbours:.4f}", kl_c=f"{last.corpus:.4f}")
            opt.step()
    finally:
        terms.remove()
    report = {"steps": hp.refine_steps, "first_step": first.to_dict(), "last_step": last.to_dict(),
              "weights": {"kl_neighbours": refiner.weights[0], "kl_corpus": refiner.weights[1]},
              "prompts": len(refiner.prompts), "texts": len(refiner.texts)}
    return {l: p.detach() for l, p in terms.params.items()}, report
