"""Prompts as MEMIT sees them: context templates, token ids, and the subject's last token.

The subject's last token is found from the tokenizer's character offsets on the exact text the
model sees (BOS included), not by tokenizing the prefix separately: that trick in the reference
code is off by one on tokenizers that add BOS. Targets are tokenized on their own and appended
as ids (memit_vllm.core.tokens), so target positions are exact whatever the tokenizer does at the
boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.records import EditRequest
from ..core.tokens import pad_id
from ..errors import MemitError


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    subject: list[int]  # the positions of the subject's tokens

    @property
    def lookup(self) -> int:
        """The index of the subject's last token."""
        return self.subject[-1]


def split_prompt(prompt: str) -> tuple[str, str]:
    pre, post = prompt.split("{}", 1)
    unescape = lambda s: s.replace("{{", "{").replace("}}", "}")  # noqa: E731
    return unescape(pre), unescape(post)


def encode(tok, template: str, request: EditRequest) -> Encoded:
    """Tokenize `template` (holding "{}" for the request prompt) with the subject filled in."""
    pre, post = split_prompt(request.prompt)
    ctx_pre, ctx_post = template.split("{}", 1)
    start = len(ctx_pre) + len(pre)
    text = ctx_pre + pre + request.subject + post + ctx_post
    end = start + len(request.subject)
    enc = tok(text, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    if not hits:
        case = f" (case {request.case_id})" if request.case_id else ""
        raise MemitError(f"request {request.text()!r}{case}: subject {request.subject!r} maps to no token in {text!r}")
    return Encoded(list(enc["input_ids"]), hits)


@torch.no_grad()
def context_templates(model, tok, seeds: list[str], length: int, seed: int) -> list[list[str]]:
    """[["{}"], [one short sampled prefix per seed word + ". {}"]], as the reference builds them."""
    if not seeds:
        return [["{}"]]
    torch.manual_seed(seed)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok(seeds, return_tensors="pt", padding=True)
        out = model.generate(**batch, do_sample=True, top_k=5, max_new_tokens=length, pad_token_id=pad_id(tok))
    finally:
        tok.padding_side = side
    texts = tok.batch_decode(out, skip_special_tokens=True)
    return [["{}"], [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]]
