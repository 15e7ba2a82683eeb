"""The edited layers' deltas refined together on the model's outputs (hparams refine_steps; 0: off).

MEMIT solves each layer alone against a second-order proxy of what it disturbs (lambda C, the preserved
keys); the layers' disturbances compound on the way up, and no per-layer term sees that: on SmolLM2 it is
most of the held-out KL of a patch (docs/hyperparameters.md, "Session 23"). Here the solved deltas take a
few Adam steps together on

    CE of each edit's new target after its prompt
    + w_n * KL(unedited || edited) of the next token after preserved prompts
      (--preserve's, and each edit's prompt asked of a neighbour subject: other subjects, the edits' relations)
    + w_c * KL(unedited || edited) at every position of statistics-corpus texts

Each weight is relative to the batch: w_n makes the preserved prompts' KL weigh refine_neighbour_weight times
the edits' CE before the first step, w_c the corpus KL refine_corpus_weight times. The balance the steps need
does not move with the batch's size, the terms do (SmolLM2: at 1,000 edits both KLs are ~15x their 100-edit
values and the CE 2.5x; absolute weights right at 100 edits undid a sixth of the rewrites at 1,000).

"Unedited" is the model this patch is made on (its stack merged): the deltas switched off. Every step draws
its rows afresh from seeded pools: what is drawn again and again is fitted, not kept (a fixed set of texts:
"Session 30"; the solve's 1,000 neighbour prompts at 1,000 edits: "Session 32"). So each neighbour row pairs
an edit's prompt with a subject drawn from the whole neighbour-subject pool, and the unedited distributions
are read beside each step. The corpus pool holds only texts the covariance read (its token budget), never
what follows (eval's held-out slice). The deltas, their Adam state and the losses are fp32; the forward runs
in the model's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

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
FORWARD_ROWS = 64


@dataclass
class Losses:
    edits: float  # the edits' mean CE (each edit's: the mean over its new target's tokens)
    neighbours: float  # mean KL of the preserved prompts' next token (0 without any)
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


@dataclass(frozen=True)
class NeighbourDraws:
    """Neighbour rows, drawn afresh each step: an edit's prompt asked of one of `subjects` (none of them an
    edited subject: preserve.neighbour_pool), as many among the preserved rows as the solve held (`rows`)."""
    subjects: list[str]
    rows: int


class Refiner:
    """The three terms' rows: the edits and the --preserve prompts tokenised once, the corpus pool read once.
    Rows are read in batches of similar length (`overhead_tokens`: length_batches' cost of one more forward;
    inf reads them in drawn order)."""

    def __init__(self, em: EditableModel, tok, hp: HParams, requests: list[EditRequest], prompts: list[str],
                 neighbours: NeighbourDraws | None, corpus: Corpus | None, seed: int,
                 overhead_tokens: float = BUCKET_OVERHEAD_TOKENS):
        self.em, self.tok, self.hp, self.requests = em, tok, hp, requests
        self.pad, self.overhead = pad_id(tok), overhead_tokens
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.edits = []  # (prompt + target ids, target ids)
        for r in requests:
            new = target_ids(tok, r.target_new)
            self.edits.append((encode(tok, "{}", r).ids + new[:-1], new))
        self.prompts = [tok(p)["input_ids"] for p in prompts] if hp.refine_neighbour_weight else []
        self.neighbours = neighbours if hp.refine_neighbour_weight and neighbours and neighbours.rows else None
        self.texts = _text_pool(tok, corpus, hp.mom2_n_tokens) if corpus is not None and hp.refine_corpus_weight \
            else []
        self.weights = (0.0, 0.0)  # w_n, w_c (prepare)

    def _draw(self, n: int, size: int) -> list[int]:
        return torch.randperm(n, generator=self.gen)[:size].tolist() if n > size else list(range(n))

    def _pick(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.gen))

    def _preserved_rows(self) -> list[list[int]]:
        """A step's preserved prompts (token ids): drawn among the fixed ones and the neighbour rows, each
        neighbour row an edit's prompt asked of a subject drawn afresh."""
        fixed, draws = len(self.prompts), self.neighbours
        rows = []
        for i in self._draw(fixed + (draws.rows if draws else 0), STEP_PROMPTS):
            if i < fixed:
                rows.append(self.prompts[i])
            else:
                request = self.requests[self._pick(len(self.requests))]
                subject = draws.subjects[self._pick(len(draws.subjects))]
                rows.append(self.tok(replace(request, subject=subject).text())["input_ids"])
        return rows

    def _hidden(self, seqs: list[list[int]]):
        ids, mask = pad_right(seqs, self.pad)
        return self.em.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.em.logits(hidden.to(self.em.output_device)).float(), -1)

    def _last_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        hidden = self._hidden(seqs)
        last = torch.tensor([len(s) - 1 for s in seqs], device=hidden.device)
        return self._logprobs(hidden[torch.arange(len(seqs), device=hidden.device), last])

    def _text_logprobs(self, texts: list[list[int]]) -> torch.Tensor:
        return self._logprobs(self._hidden(texts)).flatten(0, 1)

    def prepare(self, terms: DeltaTerms) -> None:
        """The KLs' weights, from the three terms before the first step (on one draw of each)."""
        with torch.no_grad():
            ce, kl_n, kl_c = self._terms(terms, backward=False)
        hp = self.hp
        self.weights = (hp.refine_neighbour_weight * ce / kl_n if kl_n > 0 else 0.0,
                        hp.refine_corpus_weight * ce / kl_c if kl_c > 0 else 0.0)

    def step(self, terms: DeltaTerms) -> Losses:
        """One step's gradients (added to the deltas' .grad), forward by forward so that memory holds one
        forward's graph; returns the step's losses (before it moves the deltas)."""
        return Losses(*self._terms(terms, backward=True))

    def _terms(self, terms: DeltaTerms, backward: bool) -> tuple[float, float, float]:
        """The three terms on a fresh draw of rows (their weighted gradients accumulated when `backward`)."""
        w_n, w_c = self.weights if backward else (1.0, 1.0)
        edits = [self.edits[i] for i in self._draw(len(self.edits), STEP_EDITS)]
        ce = self._accumulate(edits, [len(s) for s, _ in edits], lambda rows: self._edit_ces(rows).sum(), 1.0,
                              backward)
        prompts = self._preserved_rows() if w_n else []
        kl_n = self._accumulate(prompts, list(map(len, prompts)), lambda rows: self._kl(terms, rows, last=True), w_n,
                                backward)
        texts = [self.texts[i] for i in self._draw(len(self.texts), STEP_TEXTS)] if w_c else []
        kl_c = self._accumulate(texts, [TEXT_TOKENS] * len(texts), lambda rows: self._kl(terms, rows, last=False),
                                w_c, backward, per_row=TEXT_TOKENS)
        return ce, kl_n, kl_c

    def _accumulate(self, rows: list, lengths: list[int], summed_loss, weight: float, backward: bool,
                    per_row: int = 1) -> float:
        """The mean of `summed_loss` over `rows` (each `per_row` terms of token `lengths`), forward by
        forward of rows of similar length (`length_batches`: drawn order pads every row to the longest, ~2x
        the tokens of CounterFact prompts); with `backward` its gradient times `weight` accumulated (nothing
        is read at weight 0)."""
        total = 0.0
        if not weight or not rows:
            return total
        for part in length_batches(torch.tensor(lengths, dtype=torch.long), FORWARD_ROWS, self.overhead):
            loss = summed_loss([rows[i] for i in part.tolist()]) / (len(rows) * per_row)
            if backward:
                (weight * loss).backward()
            total += float(loss.detach())
        return total

    def _edit_ces(self, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """Each edit row's mean CE over its new target's tokens."""
        hidden = self._hidden([s for s, _ in rows])
        i, j = zip(*[(r, len(s) - len(t) + k) for r, (s, t) in enumerate(rows) for k in range(len(t))])
        logits = self.em.logits(hidden[list(i), list(j)].to(self.em.output_device)).float()
        wanted = torch.tensor([x for _, t in rows for x in t], device=logits.device)
        ce = F.cross_entropy(logits, wanted, reduction="none")
        row = torch.tensor(i, device=ce.device)
        return torch.zeros(len(rows), device=ce.device).index_add(0, row, ce) / torch.bincount(row, minlength=len(rows))

    def _kl(self, terms: DeltaTerms, rows: list[list[int]], last: bool) -> torch.Tensor:
        """Summed KL(unedited || edited) at each row's last position (`last`) or at every position."""
        read = self._last_logprobs if last else self._text_logprobs
        with terms.off():
            base = read(rows)
        return _kl(base, read(rows))


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
           prompts: list[str], neighbours: NeighbourDraws | None, corpus: Corpus | None, seed: int,
           progress: bool = True) -> tuple[dict[int, torch.Tensor], dict]:
    """`deltas` (layer -> [d_model, d_ff], on a model that has none of them merged) after hp.refine_steps
    Adam steps, and a report: the losses of the first and the last step, the rows the pools hold."""
    refiner = Refiner(em, tok, hp, requests, prompts, neighbours, corpus, seed)
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
              "prompts": len(refiner.prompts), "neighbour_rows": refiner.neighbours.rows if refiner.neighbours else 0,
              "neighbour_subjects": len(refiner.neighbours.subjects) if refiner.neighbours else 0,
              "texts": len(refiner.texts)}
    return {l: p.detach() for l, p in terms.params.items()}, report
