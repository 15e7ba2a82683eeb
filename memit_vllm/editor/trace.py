"""Reading a transformers model's layers, architecture-agnostically.

`capture` runs a forward and records layer inputs and outputs and down-projection inputs, stopping
after the last layer anyone needs (the rest of the model is not computed); it can start at a layer
from hidden states an earlier capture recorded (`compat.resume_after`: MEMIT's z optimisation edits
the output of layer L, and everything below it is the same at every step).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..compat import layer_input, layer_output, resume_after
from .arch import EditableModel


class _Stop(Exception):
    pass


@dataclass
class Captured:
    outputs: dict[int, torch.Tensor]  # layer -> its output hidden states [B, T, d_model]
    keys: dict[int, torch.Tensor]  # layer -> down-projection input [B, T, d_ff]
    inputs: dict[int, torch.Tensor]  # layer -> its input hidden states [B, T, d_model]
    tuple_len: dict[int, int]  # layer -> length of its tuple output (0 for a bare tensor)


@torch.no_grad()
def capture(em: EditableModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            outputs: list[int] = (), keys: list[int] = (), inputs: list[int] = (),
            resume: tuple[int, torch.Tensor, int] | None = None) -> Captured:
    """One forward recording the requested layer outputs, down-projection inputs and layer inputs.
    `resume` = (s, hidden, tuple_len): start at layer s from `hidden`, the input of layer s that an
    earlier capture recorded (valid while no weight below s has changed)."""
    got = Captured({}, {}, {}, {})
    last = max([*outputs, *keys, *inputs])
    handles = []

    def on_layer(i):
        def hook(module, args, output):
            hidden, got.tuple_len[i] = layer_output(output)
            if i in outputs:
                got.outputs[i] = hidden.detach().clone()
            if i == last:
                raise _Stop
        return hook

    def on_down_proj(i):
        def hook(module, args):
            got.keys[i] = args[0].detach().clone()
            if i == last and i not in outputs:  # the layer's down-projection and residual are not needed
                raise _Stop
        return hook

    def on_input(i):
        def hook(module, args, kwargs):
            got.inputs[i] = layer_input(args, kwargs).detach().clone()
        return hook

    try:
        for i in range(last + 1):
            handles.append(em.layers[i].register_forward_hook(on_layer(i)))
        for i in keys:
            handles.append(em.down_proj(i).register_forward_pre_hook(on_down_proj(i)))
        for i in inputs:
            handles.append(em.layers[i].register_forward_pre_hook(on_input(i), with_kwargs=True))
        start = resume_after(em.layers, resume[0] - 1, *resume[1:]) if resume and resume[0] > 0 else nullcontext()
        try:
            with start:
                em.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    return got


class UpwardReads:
    """Fixed batches read one layer at a time, upwards: each read starts at the inputs of the layer the
    previous read saved, instead of at the embeddings (valid while only weights at or above that layer
    changed since: the update loop changes the layer just read). Used by the edit keys (memit.KeyReader)
    and the preserved prompts (preserve.PreservedKeys)."""

    def __init__(self, em: EditableModel, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.em, self.batches = em, batches
        self.saved: tuple[int, list[torch.Tensor], int] | None = None  # (layer, inputs per batch, tuple_len)

    def read(self, layer: int, outputs: list[list[int]] | None = None):
        """Yield (batch index, Captured) with the keys at `layer` (and the layer outputs `outputs[b]`) of
        every batch; once all are read, their inputs of `layer` are what the next read starts from."""
        saved = self.saved if self.saved and self.saved[0] <= layer else None
        inputs, tuple_len = [], 0
        for b, (ids, mask) in enumerate(self.batches):
            got = capture(self.em, ids, mask, outputs=outputs[b] if outputs else (), keys=[layer], inputs=[layer],
                          resume=(saved[0], saved[1][b], saved[2]) if saved else None)
            inputs.append(got.inputs[layer])
            tuple_len = got.tuple_len.get(layer - 1, 0)  # how layer-1 returns: resume_after mimics it
            yield b, got
        self.saved = (layer, inputs, tuple_len) if inputs else None
