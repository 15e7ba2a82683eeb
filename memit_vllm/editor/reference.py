"""MEMIT eq. 16 for ONE edit, written from the equations with none of the editor's shortcuts: the
oracle the batched, prefix-cached z optimisation (targets.py) is tested and benchmarked against."""

from __future__ import annotations

import torch

from ..core.records import EditRequest
from .hparams import HParams


def plain_z_delta(model, tok, layers, request: EditRequest, templates, layer, hp: HParams):
    """MEMIT eq. 16 for ONE edit, written from the equations: full forward every step, full logits,
    delta added by a hook at layer `layer`'s output; subject position from the tokenized prefix. The
    request's paraphrases are rewrite prompts too, without templates."""
    tgt = tok(request.target_new, add_special_tokens=False)["input_ids"]
    pre, post = request.prompt.split("{}")
    # (text up to the subject, text after it): the prompt in each template, each paraphrase, the KL prompt
    parts = [(t.split("{}")[0] + pre, post + t.split("{}")[1]) for t in templates]
    parts += [tuple(p.split("{}")) for p in request.paraphrases] + [("", " is a")]
    n_rewrite = len(parts) - 1
    texts = [(head + request.subject, tail) for head, tail in parts]
    lookups = [len(tok(a)["input_ids"]) - 1 for a, _ in texts]
    seqs = [tok(a + b)["input_ids"] + (tgt[:-1] if i < n_rewrite else []) for i, (a, b) in enumerate(texts)]
    prompt_lens = [len(tok(a + b)["input_ids"]) for a, b in texts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])

    delta = torch.zeros(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd,
                        requires_grad=True)
    state = {}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if "init" not in state:
            state["init"] = h[0, lookups[0]].detach().clone()
        h = h.clone()
        for i, pos in enumerate(lookups):
            h[i, pos] = h[i, pos] + delta
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = layers[layer].register_forward_hook(hook)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init = None
    try:
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits, dim=-1)
            nlls = []
            for i in range(n_rewrite):
                n = prompt_lens[i]
                nlls.append(-sum(logp[i, n - 1 + j, t] for j, t in enumerate(tgt)) / len(tgt))
            nll = torch.stack(nlls).mean()
            kl_logp = logp[n_rewrite, lookups[-1]]
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum()
            loss = nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / state["init"].norm() ** 2
            if loss < hp.v_early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = hp.clamp_norm_factor * state["init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    return delta.detach()
