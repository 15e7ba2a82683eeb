"""The target vectors z_i (MEMIT eq. 16), many edits at a time.

For each edit, delta_i is optimised (Adam, fp32) so that adding it to layer L's output at the
subject's last token makes the model say the new target after every context-templated prompt,
while the KL term on "{subject} is a" keeps the subject's other properties. The loss, clamp, weight
decay and early stop are the reference's, per edit. What makes it fast changes no result:
- edits share a batch: each delta_i only touches its own prompts, so the gradient of the summed
  loss w.r.t. delta_i is that of loss_i, and Adam keeps separate state per edit (one parameter
  tensor each; a finished edit's grad is None, so Adam leaves it alone);
- layers 0..L are run once: their activations do not depend on delta, so every step starts at L+1;
- the prompt tokens before the subject's last token do not depend on delta at any layer: their
  keys/values are cached, and each step runs only the few tokens from the subject's last one on;
- those suffixes are 2 to ~10 tokens long, so one batch padded to the longest is much padding:
  rows run in groups of similar length instead (`length_buckets`); the KL rows stop at the
  subject's last token, where the KL is read, and are not run at all when the bare prompt's row
  holds the same tokens up to there.
One option trades exactness for speed, and only when asked (`HParams.z_dtype`, make-patch --z-dtype): the
forward/backward above L in bf16 (`precision.computing_in`), the delta, Adam and the loss still fp32.
"""

from __future__ import annotations

from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..compat import PrefixCache, attention_implementation, resume_after
from ..core.records import EditRequest
from ..core.tokens import BUCKET_OVERHEAD_TOKENS, length_buckets, pad_id, pad_right, target_ids
from ..errors import MemitError
from .arch import EditableModel
from .hparams import HParams
from .offload import weights_reread
from .precision import computing_in, forward_dtype
from .prompts import encode
from .target_store import TargetStore
from .trace import capture

KL_PROMPT = "{} is a"


@dataclass
class _Rows:
    """The prompts of a batch of edits, flattened: rewriting prompts then one KL prompt per edit."""

    ids: torch.Tensor  # [P, T]
    mask: torch.Tensor
    edit: torch.Tensor  # [P] edit index within the batch
    lookup: torch.Tensor  # [P] subject's last token
    is_kl: torch.Tensor  # [P] bool
    tgt_row: torch.Tensor  # [N] per target token: its row, position and token id
    tgt_pos: torch.Tensor
    tgt_id: torch.Tensor
    tgt_len: torch.Tensor  # [P] number of target tokens of each rewriting prompt (0 for KL rows)
    first_row: torch.Tensor  # [E] the bare-prompt row of each edit (h_init is read there)
    kl_row: torch.Tensor  # [E] the row whose subject's last token gives each edit's KL distribution


def _build_rows(tok, requests: list[EditRequest], templates: list[str]) -> _Rows:
    seqs, edit, lookup, is_kl, tgt_len = [], [], [], [], []
    tgt_row, tgt_pos, tgt_id, first_row, kl_row = [], [], [], [], []
    for e, r in enumerate(requests):
        tgt = target_ids(tok, r.target_new)
        first_row.append(len(seqs))
        # the prompt in every context template, then each paraphrase the request carries, bare
        for enc in [encode(tok, t, r) for t in templates] + [encode(tok, "{}", replace(r, prompt=p))
                                                            for p in r.paraphrases]:
            row = len(seqs)
            seqs.append(enc.ids + tgt[:-1])
            for j, tid in enumerate(tgt):
                tgt_row.append(row), tgt_pos.append(len(enc.ids) - 1 + j), tgt_id.append(tid)
            edit.append(e), lookup.append(enc.lookup), is_kl.append(False), tgt_len.append(len(tgt))
    for e, r in enumerate(requests):
        enc = encode(tok, "{}", replace(r, prompt=KL_PROMPT))
        kl = enc.ids[: enc.lookup + 1]  # the KL is read at the subject's last token: " is a" cannot reach it
        first = first_row[e]
        if lookup[first] == enc.lookup and seqs[first][: enc.lookup + 1] == kl:
            kl_row.append(first)  # a prompt that starts with the subject holds the same tokens up to there
            continue
        kl_row.append(len(seqs))
        seqs.append(kl)
        edit.append(e), lookup.append(enc.lookup), is_kl.append(True), tgt_len.append(0)
    ids, mask = pad_right(seqs, pad_id(tok))
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt)  # noqa: E731
    return _Rows(ids, mask, t(edit), t(lookup), t(is_kl, torch.bool), t(tgt_row), t(tgt_pos), t(tgt_id),
                 t(tgt_len), t(first_row), t(kl_row))


@dataclass
class TargetResult:
    z: torch.Tensor  # [n, d_model] fp32: h_init + delta
    delta: torch.Tensor  # [n, d_model] the optimised delta_i
    final_loss: torch.Tensor  # [n] the last loss evaluated for each edit
    target_prob: torch.Tensor  # [n] exp(-NLL), mean over prompts, at that last evaluation
    steps: torch.Tensor  # [n] optimiser steps taken
    resumed: torch.Tensor  # [n] 1 where the result was read back from a resume dir (target_store.py), else 0


def compute_targets(em: EditableModel, tok, requests: list[EditRequest], templates: list[str], layer: int,
                    hp: HParams, progress: bool = True, bucket_overhead_tokens: float = BUCKET_OVERHEAD_TOKENS,
                    store: TargetStore | None = None,
                    fisher: Callable[[], torch.Tensor] | None = None) -> TargetResult:
    """z for every request at `layer`, optimised in batches of hp.z_batch_edits edits. Batches are formed
    from edits of similar suffix length (less padding); results come back in request order.
    `bucket_overhead_tokens`: the cost of one more padded call, see `length_buckets` (speed only).
    `store`: where finished batches are kept and read back from (a resumed run). `fisher`: computes F
    (sensitivity.output_fisher) for the penalty of hp.z_fisher_weight and the metric of "steepest_fisher",
    once, and only if a batch is not read back."""
    if hp.reads_fisher and fisher is None:
        raise MemitError("z_fisher_weight and v_optimizer steepest_fisher need F: give compute_targets `fisher`")
    fisher = cache(fisher) if fisher else None
    metric = cache(lambda: fisher_metric_inverse(fisher())) if hp.v_optimizer == "steepest_fisher" else None
    order = sorted(range(len(requests)), key=lambda i: _suffix_len(tok, requests[i]))
    parts = []
    bar = tqdm(total=len(requests), desc="z vectors", unit="edit", disable=not progress)
    for start in range(0, len(requests), hp.z_batch_edits):
        chunk = [requests[i] for i in order[start : start + hp.z_batch_edits]]
        kept = store.load(chunk, em.d_model) if store else None
        if kept is not None:
            parts.append(TargetResult(**kept, resumed=torch.ones(len(chunk), dtype=torch.long)))
        else:
            parts.append(_optimise(em, tok, chunk, templates, layer, hp, bucket_overhead_tokens,
                                   fisher() if hp.z_fisher_weight else None, metric() if metric else None))
            if store:
                store.save(chunk, parts[-1])
        bar.update(len(chunk))
    bar.close()
    back = torch.tensor(order).argsort()  # the inverse permutation
    result = TargetResult(*(torch.cat([getattr(p, f) for p in parts])[back] for f in TargetResult.__dataclass_fields__))
    return scaled_for_delivery(result, hp) if hp.v_delivery_scale != 1 else result


DELIVERY_SCALES = (0.5, 2.0)  # the per-edit scales of HParams.v_delivery_target stay within these


def scaled_to_reach(result: TargetResult, reached: torch.Tensor, hp: HParams) -> TargetResult:
    """Each delta times hp.v_delivery_target / rho_i (within DELIVERY_SCALES and the clamp), rho_i the share of delta_i
    that a first update made with these targets delivered: the projection on it of `reached` [n, d_model]
    (the last edited layer's output at the edit's prompt after that update) minus the output before."""
    h, d = result.z - result.delta, result.delta
    rho = ((reached.to(d) - h) * d).sum(1) / (d * d).sum(1).clamp(min=1e-12)
    return _rescaled(result, (hp.v_delivery_target / rho.clamp(min=1e-3)).clamp(*DELIVERY_SCALES)[:, None], hp)


def scaled_for_delivery(result: TargetResult, hp: HParams) -> TargetResult:
    """Each delta times hp.v_delivery_scale, within the clamp (hp.clamp_norm_factor x |h|)."""
    return _rescaled(result, hp.v_delivery_scale, hp)


def _rescaled(result: TargetResult, scale: float | torch.Tensor, hp: HParams) -> TargetResult:
    """Each delta times `scale` (one, or one per row [n, 1]), within the clamp; h stays."""
    h = result.z - result.delta
    delta = within_clamp(result.delta * scale, hp.clamp_norm_factor * h.norm(dim=1, keepdim=True))
    return replace(result, z=h + delta, delta=delta)


def within_clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """`delta` (over its last dim) shortened to `max_norm` where it is longer: the reference's clamp."""
    norm = delta.norm(dim=-1, keepdim=True)
    return torch.where(norm > max_norm, delta * (max_norm / norm), delta)


def _suffix_len(tok, request: EditRequest) -> int:
    """Tokens from the subject's last one to the target's second-to-last: what each z step runs."""
    enc = encode(tok, "{}", request)
    return len(enc.ids) - enc.lookup + len(target_ids(tok, request.target_new)) - 1


class _PrefixSplit:
    """Each prompt split at the subject's last token. The prefix before it does not depend on delta at
    any layer, so its keys/values are computed once (left-padded, so every suffix starts at the same
    cache position) and each step runs only the suffix tokens through the layers above L."""

    def __init__(self, em: EditableModel, rows: _Rows, h_layer: torch.Tensor, bucket_overhead_tokens: float,
                 dtype: torch.dtype):
        self.bucket_overhead_tokens, self.dtype = bucket_overhead_tokens, dtype
        lengths = rows.mask.sum(1)
        self.pre_len, self.suf_len = rows.lookup, lengths - rows.lookup
        width, self.S = int(rows.lookup.max()), int(self.suf_len.max())
        j = torch.arange(self.S)
        self.suf_mask = (j[None] < self.suf_len[:, None]).long()
        src = (rows.lookup[:, None] + j[None]).clamp(max=rows.ids.shape[1] - 1)
        self.suf_ids = rows.ids.gather(1, src) * self.suf_mask
        self.suf_h = h_layer.gather(1, src[..., None].expand(-1, -1, h_layer.shape[2])) * self.suf_mask[..., None]
        self.positions = self.pre_len[:, None] + j[None]
        k = torch.arange(width)
        self.pre_mask = (k[None] >= width - self.pre_len[:, None]).long()  # left padding
        self.prefix = None
        if width:
            src = (k[None] - (width - self.pre_len[:, None])).clamp(min=0)
            pre_ids = rows.ids.gather(1, src) * self.pre_mask
            self.prefix = PrefixCache(em.model, pre_ids, self.pre_mask, (self.pre_mask.cumsum(1) - 1).clamp(min=0))

    def forward(self, em: EditableModel, layer: int, tuple_len: int, sel: torch.Tensor, delta: torch.Tensor):
        """Final hidden states [len(sel), S, d] of the suffixes (padding past each row's own length),
        with delta added at layer L's output; rows of similar suffix length run together."""
        parts, order = [], []
        for group in length_buckets(self.suf_len[sel], self.bucket_overhead_tokens):
            width = int(self.suf_len[sel[group]].max())
            out = self._run(em, layer, tuple_len, sel[group], delta[group], width)
            parts.append(F.pad(out, (0, 0, 0, self.S - width)))
            order.append(group)
        return torch.cat(parts)[torch.cat(order).argsort()]

    def _run(self, em: EditableModel, layer: int, tuple_len: int, rows: torch.Tensor, delta: torch.Tensor,
             width: int):
        h = self.suf_h[rows, :width].index_put((torch.arange(len(rows)), torch.zeros(len(rows), dtype=torch.long)),
                                               delta, accumulate=True).to(self.dtype)
        mask = self.suf_mask[rows, :width]
        kwargs = {"use_cache": False}
        if self.prefix is not None:
            kwargs = self.prefix.continue_rows(rows)  # each call starts from the prefix alone
            mask = torch.cat([self.pre_mask[rows], mask], dim=1)
        with resume_after(em.layers, layer, h, tuple_len):
            out = em.model.base_model(input_ids=self.suf_ids[rows, :width], attention_mask=mask,
                                      position_ids=self.positions[rows, :width], **kwargs).last_hidden_state
        return out.to(h.device)  # from the last layer's device (a device map) to the z work's


def _optimise(em: EditableModel, tok, requests, templates, layer, hp: HParams,
              bucket_overhead_tokens: float, fisher: torch.Tensor | None,
              metric_inverse: torch.Tensor | None) -> TargetResult:
    rows = _build_rows(tok, requests, templates)
    got = capture(em, rows.ids, rows.mask, outputs=[layer])
    # the z work (delta, Adam, loss) beside the output head that computes its logits
    h_layer, tuple_len = got.outputs[layer].to(em.output_device), got.tuple_len[layer]
    dtype = forward_dtype(hp.z_dtype, em.model)  # the forward's; delta, Adam and loss are fp32
    h_layer = h_layer.float()
    h_init = h_layer[rows.first_row, rows.lookup[rows.first_row]]  # [n, d]
    # torch's CPU flash-attention backward in bf16/fp16 is slower than fp32's on these short rows (suffixes
    # of 2-10 tokens over prefixes of ~30); the plain attention is 1.6x faster there (bench/make_patch.py z-speed)
    reduced_on_cpu = dtype != torch.float32 and h_init.device.type == "cpu"
    attention = attention_implementation(em.model, "eager") if reduced_on_cpu else nullcontext()
    with computing_in(em.model, dtype), attention, weights_reread(em.model):
        split = _PrefixSplit(em, rows, h_layer, bucket_overhead_tokens, dtype)
        return _descend(em, rows, split, h_init, layer, tuple_len, hp, fisher, metric_inverse)


class Steepest(torch.optim.Optimizer):
    """Normalised steepest descent: each step moves a delta a fixed length (its group's lr) along its
    negative gradient, or along M^-1 times it (`metric_inverse`: the steepest direction in the norm of M).
    Adam scales every coordinate's step alike, so from zero its deltas are sign-like vectors that grow to
    the clamp (on SmolLM2 at lr 2.0, 88% of 100 edits end there): longer than the early stop needs, and
    every extra unit leaks to other keys (docs/hyperparameters.md, "Session 17")."""

    def __init__(self, params: list[torch.Tensor], lengths: list[float], metric_inverse: torch.Tensor | None = None):
        super().__init__([{"params": [p], "lr": length} for p, length in zip(params, lengths)], {})
        self.metric_inverse = metric_inverse

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            p = group["params"][0]
            if p.grad is not None:
                u = p.grad if self.metric_inverse is None else self.metric_inverse.to(p.device) @ p.grad
                p.sub_(u, alpha=group["lr"] / float(u.norm().clamp(min=1e-12)))


FISHER_METRIC_RIDGE = 0.1  # of F's mean eigenvalue, added to F: directions F cannot tell apart stay steppable


def fisher_metric_inverse(fisher: torch.Tensor) -> torch.Tensor:
    """(F + ridge I)^-1 in float64 then fp32: "steepest_fisher" steps along it, the change of the edited state
    that raises the target most per unit of expected KL on ordinary text (sensitivity.py)."""
    f = fisher.double()
    ridge = FISHER_METRIC_RIDGE * f.trace() / f.shape[0]
    return torch.linalg.inv(f + ridge * torch.eye(f.shape[0], dtype=f.dtype, device=f.device)).float()


def _descend(em: EditableModel, rows: _Rows, split: _PrefixSplit, h_init: torch.Tensor, layer: int,
             tuple_len: int, hp: HParams, fisher: torch.Tensor | None,
             metric_inverse: torch.Tensor | None) -> TargetResult:
    """Adam (or Steepest) on every edit's delta until its loss falls under the early-stop value, or with
    v_early_stop="most_probable" until the target is the argmax after every rewrite row (ENCORE's MPES,
    Gupta et al. 2025: no push past what greedy decoding needs), or the step budget."""
    n, P = len(h_init), rows.ids.shape[0]
    logits = lambda hidden: em.logits(hidden).float()  # noqa: E731
    max_norm = hp.clamp_norm_factor * h_init.norm(dim=1)

    deltas = [torch.zeros(h_init.shape[1], requires_grad=True) for _ in range(n)]
    if hp.v_optimizer in ("steepest", "steepest_fisher"):
        opt = Steepest(deltas, (hp.v_step * h_init.norm(dim=1)).tolist(), metric_inverse)
    else:
        opt = torch.optim.Adam(deltas, lr=hp.v_lr)
    active = torch.ones(n, dtype=torch.bool)
    kl_init = None
    final_loss, target_prob = torch.zeros(n), torch.zeros(n)
    steps = torch.zeros(n, dtype=torch.long)
    n_rewrite = torch.zeros(n).index_add_(0, rows.edit[~rows.is_kl], torch.ones(int((~rows.is_kl).sum())))
    # Positions in suffix coordinates: the subject's last token is suffix position 0.
    tgt_pos = rows.tgt_pos - rows.lookup[rows.tgt_row]

    for it in range(hp.v_num_grad_steps):
        sel = active[rows.edit].nonzero().squeeze(1)  # rows of the edits still optimising
        local = torch.full((P,), -1, dtype=torch.long)
        local[sel] = torch.arange(len(sel))
        delta = torch.stack(deltas)  # [n, d]
        # index_select: its backward sums each edit's rows in a fixed order (plain indexing's backward is an
        # accumulating index_put_, whose multi-threaded CPU kernel adds in a varying order: z not repeatable)
        out = split.forward(em, layer, tuple_len, sel, delta.index_select(0, rows.edit[sel]))

        # NLL of the target tokens, mean over tokens of a prompt, then over an edit's prompts.
        keep = active[rows.edit[rows.tgt_row]]
        t_row, t_pos, t_id = rows.tgt_row[keep], tgt_pos[keep], rows.tgt_id[keep]
        t_logits = logits(out[local[t_row], t_pos])
        logp = torch.log_softmax(t_logits, dim=-1).gather(1, t_id[:, None]).squeeze(1)
        prompt_nll = torch.zeros(P).index_add(0, t_row, -logp) / rows.tgt_len.clamp(min=1)
        prompt_prob = torch.zeros(P).index_add(0, t_row, logp.detach()) / rows.tgt_len.clamp(min=1)
        rewrite = ~rows.is_kl
        nll = torch.zeros(n).index_add(0, rows.edit[rewrite], prompt_nll[rewrite]) / n_rewrite
        prob = torch.zeros(n).index_add(0, rows.edit[rewrite], prompt_prob[rewrite].exp()) / n_rewrite

        # KL(P_now || P_init) at the subject's last token of "{subject} is a".
        live = active.nonzero().squeeze(1)
        kl_logp = torch.log_softmax(logits(out[local[rows.kl_row[live]], 0]), dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()  # every edit is active at step 0, in edit order
        kl = torch.zeros(n).index_add(0, live, (kl_logp.exp() * (kl_logp - kl_init[live])).sum(1))

        decay = hp.v_weight_decay * delta.norm(dim=1) / h_init.norm(dim=1) ** 2
        loss = nll + hp.kl_factor * kl + decay
        if fisher is not None:  # the delta's expected KL on text in general, were it added there (sensitivity.py)
            loss = loss + hp.z_fisher_weight * 0.5 * ((delta @ fisher.to(delta.device)) * delta).sum(1)

        final_loss = torch.where(active, loss.detach(), final_loss)
        target_prob = torch.where(active, prob, target_prob)
        if hp.v_early_stop == "most_probable":  # every target token of every rewrite row is the argmax
            missed = (t_logits.argmax(dim=-1) != t_id).float()
            missed = torch.zeros(n).index_add(0, rows.edit[t_row], missed * rewrite[t_row])
            active &= missed > 0
        else:
            active &= loss.detach() >= hp.v_early_stop_loss
        if it == hp.v_num_grad_steps - 1 or not active.any():
            break
        opt.zero_grad(set_to_none=True)
        loss[active].sum().backward()
        for e in (~active).nonzero().squeeze(1).tolist():
            deltas[e].grad = None  # finished: Adam skips it and its state
        opt.step()
        steps += active.long()
        with torch.no_grad():
            for e in active.nonzero().squeeze(1).tolist():
                deltas[e].copy_(within_clamp(deltas[e], max_norm[e]))

    delta = torch.stack([d.detach() for d in deltas])
    return TargetResult(h_init + delta, delta, final_loss, target_prob, steps, torch.zeros(n, dtype=torch.long))
