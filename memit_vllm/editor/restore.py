"""Texts whose outputs at the last edited layer an update pulls back to where the model being edited had
them before it (HParams.preserve_restore, corpus_restore_tokens), instead of holding each layer's.

MEMIT's memory term holds a key's output at each layer as the model is when that layer is solved; but
the update's layers below already moved the outputs it feeds, and holding keeps that drift. Reading the
texts' outputs at the last edited layer before the update, each layer's solve can ask for the share of
the way back it is to deliver (1 / the edited layers left, as for the edits' residuals): the term
w |Delta k - r|^2 adds w r k^T to the solve's right-hand side (solve.py: `pull`). On a stack the anchor
is the stack's outputs, not the base's: pulling the stack's own drift back took its edits' reach with it
(docs/benchmarks.md, "Session 20" and "Session 21")."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .trace import UpwardReads


class AnchoredTexts:
    """Fixed token batches (ids, mask), read one layer at a time upwards (trace.UpwardReads); with
    `z_layer`, their outputs there as the first read finds them are the anchor: that read must be on the
    model as the update finds it (a stack merged, no layer updated yet), as the update loop's first is.
    It runs up to z_layer anyway, so the anchor costs no pass of its own. `keep`: per batch, the tokens
    read (a subset of its attention mask; default: every token)."""

    def __init__(self, em, batches: list[tuple[torch.Tensor, torch.Tensor]], z_layer: int | None = None,
                 keep: list[torch.Tensor] | None = None):
        self.em, self.z_layer = em, z_layer
        self.reads = UpwardReads(em, batches)
        self.keep = [mask.bool() for _, mask in batches] if keep is None else [k.bool() for k in keep]
        self.tokens = sum(int(k.sum()) for k in self.keep)
        self.anchor: list[torch.Tensor] = []

    def read(self, layer: int, share: float) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per batch, on the model as it is: the keys at `layer` of every token [tokens, d_ff] and, with
        a z_layer, the change of `layer`'s output that brings `share` of the way back to the anchored
        outputs [d_model, tokens] (float64, beside the layer)."""
        device = self.em.device_of(layer)
        outputs = None if self.z_layer is None else [[self.z_layer]] * len(self.reads.batches)
        for b, got in self.reads.read(layer, outputs):
            mask = self.keep[b]
            k = got.keys[layer][mask.to(got.keys[layer].device)].to(device, torch.float64)
            if self.z_layer is None:
                yield k, None
                continue
            now = got.outputs[self.z_layer][mask.to(got.outputs[self.z_layer].device)]
            if len(self.anchor) == b:
                self.anchor.append(now)
            now = now.to(device, torch.float64)
            r = (self.anchor[b].to(device, torch.float64) - now) * share
            yield k, self.em.to_output_space(layer, self.z_layer, k.T, r.T)
