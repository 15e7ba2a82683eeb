"""Texts whose outputs an update pulls back to the base model's, instead of holding them where the model
being edited has them (HParams.preserve_restore, corpus_restore_tokens).

MEMIT's memory term holds a key's output at each layer as the model being edited has it; but the layers
below (of this update, and the patches of a stack under it) already moved the outputs it feeds, and
holding keeps that drift. Reading the texts' outputs at the last edited layer on the base model first,
each layer's solve can ask for the share of the way back it is to deliver (1 / the edited layers left,
as for the edits' residuals): the term w |Delta k - r|^2 adds w r k^T to the solve's right-hand side
(solve.py: `pull`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .precision import computing_in
from .trace import UpwardReads, capture


class AnchoredTexts:
    """Fixed token batches (ids, mask), read one layer at a time upwards (trace.UpwardReads); with
    `z_layer`, their outputs there are read at construction, which must be on the base model (before a
    stack is merged), in `reading` (the dtype the update's reads run in)."""

    def __init__(self, em, batches: list[tuple[torch.Tensor, torch.Tensor]], z_layer: int | None = None,
                 reading: torch.dtype | None = None):
        self.em, self.z_layer = em, z_layer
        self.reads = UpwardReads(em, batches)
        self.tokens = sum(int(mask.sum()) for _, mask in batches)
        self.base = []
        if z_layer is not None:
            with torch.no_grad(), computing_in(em.model, reading or em.model.dtype):
                self.base = [capture(em, ids, mask, outputs=[z_layer]).outputs[z_layer][mask.bool()]
                             for ids, mask in batches]

    def read(self, layer: int, share: float) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per batch, on the model as it is: the keys at `layer` of every token [tokens, d_ff] and, with
        a z_layer, the change of `layer`'s output that brings `share` of the way back to the base outputs
        [d_model, tokens] (float64, beside the layer)."""
        device = self.em.device_of(layer)
        outputs = None if self.z_layer is None else [[self.z_layer]] * len(self.reads.batches)
        for b, got in self.reads.read(layer, outputs):
            mask = self.reads.batches[b][1].bool()
            k = got.keys[layer][mask.to(got.keys[layer].device)].to(device, torch.float64)
            if self.z_layer is None:
                yield k, None
                continue
            now = got.outputs[self.z_layer][mask.to(got.outputs[self.z_layer].device)].to(device, torch.float64)
            r = (self.base[b].to(device, torch.float64) - now) * share
            yield k, self.em.to_output_space(layer, self.z_layer, k.T, r.T)
