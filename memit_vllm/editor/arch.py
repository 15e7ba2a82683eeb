"""A loaded causal LM as MEMIT edits it: the down-projections of the architecture table
(memit_vllm.core.architectures), their shapes, and their checkpoint names."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..compat import load_causal_lm
from ..core.architectures import by_model_type
from ..core.tokens import ensure_pad_token
from ..errors import MemitError


class EditableModel:
    """A causal LM seen as MEMIT needs it: layers, down-projections, their checkpoint names."""

    def __init__(self, model: nn.Module, checkpoint_keys: list[str] | None = None):
        self.model = model
        self.arch = by_model_type(model.config.model_type)
        self.layers: nn.ModuleList = model.get_submodule(self.arch.layers)
        self.n_layers = len(self.layers)
        self._keys = set(checkpoint_keys) if checkpoint_keys is not None else None

    @property
    def d_ff(self) -> int:
        w = self.down_proj(0).weight
        return w.shape[0] if self.arch.conv1d else w.shape[1]

    @property
    def d_model(self) -> int:
        w = self.down_proj(0).weight
        return w.shape[1] if self.arch.conv1d else w.shape[0]

    def down_proj(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.arch.down_proj)

    def param_name(self, layer: int) -> str:
        """The checkpoint key of layer `layer`'s down-projection weight."""
        if self._keys is None:
            return self.arch.weight_name(layer)
        return self.arch.checkpoint_name(layer, self._keys)

    def to_checkpoint_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A (d_model, d_ff) update in the weight's own layout."""
        return delta.T.contiguous() if self.arch.conv1d else delta

    @torch.no_grad()
    def add_to_weight(self, layer: int, delta: torch.Tensor) -> None:
        w = self.down_proj(layer).weight
        w += self.to_checkpoint_layout(delta).to(w.dtype)


def load_editable(model: str | Path | Checkpoint):
    """(tokenizer, EditableModel) of a checkpoint as the editor uses them: fp32, eval mode, weights
    frozen, a pad token (batched sampling pads; many Llama tokenizers define none)."""
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
    tok, hf = load_causal_lm(ckpt.path)
    ensure_pad_token(tok)
    for p in hf.parameters():
        p.requires_grad_(False)
    return tok, EditableModel(hf, ckpt.keys())


def checkpoint_dims(ckpt: Checkpoint) -> tuple[str, int, int]:
    """(model_type, number of layers, d_ff) read from the checkpoint's config and weight shapes, without
    loading the model: the hyperparameters are resolved and checked before the heavy work."""
    model_type = ckpt.config.get("model_type", "?")
    arch = by_model_type(model_type)
    keys = ckpt.keys()
    layers = {arch.layer_of(k) for k in keys} - {None}
    if not layers:
        raise MemitError(f"{ckpt.path} holds no {arch.down_proj} weights: not a {model_type} checkpoint")
    shape = ckpt.shape(arch.checkpoint_name(min(layers), keys))
    return model_type, max(layers) + 1, shape[0] if arch.conv1d else shape[1]


def check_layers(layers: list[int], n_layers: int) -> None:
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise MemitError(f"layers {bad or layers} out of range: this model has layers 0..{n_layers - 1}")
    if sorted(set(layers)) != list(layers):
        raise MemitError(f"layers {layers} must be distinct and increasing")
