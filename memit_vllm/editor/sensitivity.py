"""How much a change of the edited layers' outputs moves the model's predictions on ordinary text: the
Fisher information of the next-token distributions with respect to those hidden states
(HParams.z_fisher_weight).

An update leaks a small share of every edit's residual into the outputs at every other key
(docs/hyperparameters.md, "Drift": ~1-2% per edit at SmolLM2's layers), along the edit's own delta, at
each edited layer. Added at a random text position of layer l's output, a change d moves the
predictions there and after it by a KL of about d^T F_l d / 2, with F_l = E[g g^T], g the gradient of
log p(y) (y sampled from the model's own next-token distributions) with respect to that state. A
change at a lower layer passes through more layers on its way to the output, so the penalty uses the
mean of F_l over the edited layers: d^T F d / 2 per edit prefers a delta that makes its own prompt say
the target while moving little else wherever the update writes it.
"""

from __future__ import annotations

import torch

from ..compat import layer_output, resume_after
from ..core.tokens import pad_id, pad_right
from .arch import EditableModel
from .covariance import Corpus, packed, token_batches
from .precision import computing_in
from .trace import capture


GRAD_TOKENS = 1024  # padded tokens per forward and backward: the activations the backward keeps


def output_fisher(em: EditableModel, tok, corpus: Corpus, layers: list[int], tokens: int, dtype: torch.dtype,
                  seed: int, grad_tokens: int = GRAD_TOKENS) -> torch.Tensor:
    """The mean over `layers` of F_l [d_model, d_model] (float32, on the output head's device) over the
    first `tokens` tokens of `corpus`: each position's gradient of the log-likelihood of next tokens
    sampled from the model (teacher forced on the corpus text) with respect to layer l's output there.
    One forward and backward per part of about `grad_tokens` padded tokens serves every layer, so the
    backward keeps one part's activations; the draws are made per corpus batch, so the part size does not
    change F. Accumulated in float64, run in `dtype`."""
    layers = sorted(set(layers))
    d, low = em.d_model, layers[0]
    total, count = torch.zeros(d, d, dtype=torch.float64, device="cpu"), 0  # the grads come to the CPU
    sampler = torch.Generator().manual_seed(seed)
    states = {}

    def keep(i):
        def hook(module, args, output):
            states[i] = layer_output(output)[0]
            states[i].retain_grad()
        return hook

    handles = [em.layers[i].register_forward_hook(keep(i)) for i in layers[1:]]
    try:
        with computing_in(em.model, dtype):
            for batch in token_batches(tok, corpus, tokens):
                draws = torch.rand(sum(map(len, batch)), generator=sampler)  # one per position, in row order
                for part in packed(batch, grad_tokens):
                    ids, mask = pad_right(part, pad_id(tok))
                    with torch.no_grad():
                        got = capture(em, ids, mask, outputs=[low])
                    states[low] = got.outputs[low].detach().requires_grad_(True)
                    with resume_after(em.layers, low, states[low], got.tuple_len[low]):
                        final = em.model.base_model(input_ids=ids, attention_mask=mask,
                                                    use_cache=False).last_hidden_state
                    live = mask.bool()
                    flat = final[live]
                    flat.backward(_head_gradient(em, flat.detach(), draws[: len(flat)]))
                    draws = draws[len(flat) :]
                    for i in layers:
                        g = states[i].grad[live.to(states[i].device)].double().cpu()
                        total += g.T @ g
                    count += len(flat)
    finally:
        for h in handles:
            h.remove()
    return (total / max(count * len(layers), 1)).float().to(em.output_device)


HEAD_ROWS = 256  # positions per output-head chunk: their vocabulary-wide log-probabilities exist at once


def _head_gradient(em: EditableModel, final: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """d log p(y) / d final for every row of `final` (the final hidden states), y drawn from the model's
    own distribution there by inverting its cumulative distribution at the row's uniform draw (so the
    draw of a position does not depend on how rows are chunked); the head runs in chunks, so a large
    vocabulary never holds all rows' logits."""
    grad = torch.empty_like(final)
    for start in range(0, len(final), HEAD_ROWS):
        h = final[start : start + HEAD_ROWS].clone().requires_grad_(True)
        logp = torch.log_softmax(em.logits(h).float(), dim=-1)
        cdf = logp.detach().exp().cumsum(-1)
        u = draws[start : start + HEAD_ROWS].to(cdf.device).unsqueeze(1) * cdf[:, -1:]
        sampled = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)
        logp.gather(1, sampled).sum().backward()
        grad[start : start + HEAD_ROWS] = h.grad
    return grad
