"""Where MEMIT edits each supported architecture: the MLP down-projection of chosen layers.

The edited matrix maps the MLP's hidden activation (d_ff) back to the residual stream (d_model).
nn.Linear stores it as (d_model, d_ff); GPT-2's Conv1D as (d_ff, d_model), hence `conv1d`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MemitError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # attribute path of the decoder layer list
    down_proj: str  # path of the down-projection inside one layer
    conv1d: bool = False


ARCHS = {
    "llama": ArchSpec("model.layers", "mlp.down_proj"),
    "qwen2": ArchSpec("model.layers", "mlp.down_proj"),
    "mistral": ArchSpec("model.layers", "mlp.down_proj"),
    "gpt2": ArchSpec("transformer.h", "mlp.c_proj", conv1d=True),
    "gptj": ArchSpec("transformer.h", "mlp.fc_out"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "mlp.dense_4h_to_h"),
}


def arch_spec(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise MemitError(f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


class EditableModel:
    """A causal LM seen as MEMIT needs it: layers, down-projections, their checkpoint names."""

    def __init__(self, model: nn.Module, checkpoint_keys: list[str] | None = None):
        self.model = model
        self.spec = arch_spec(model.config.model_type)
        self.layers: nn.ModuleList = model.get_submodule(self.spec.layers)
        self.n_layers = len(self.layers)
        self._keys = set(checkpoint_keys) if checkpoint_keys is not None else None

    @property
    def d_ff(self) -> int:
        w = self.down_proj(0).weight
        return w.shape[0] if self.spec.conv1d else w.shape[1]

    @property
    def d_model(self) -> int:
        w = self.down_proj(0).weight
        return w.shape[1] if self.spec.conv1d else w.shape[0]

    def down_proj(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.spec.down_proj)

    def param_name(self, layer: int) -> str:
        """The checkpoint key of layer `layer`'s down-projection weight."""
        name = f"{self.spec.layers}.{layer}.{self.spec.down_proj}.weight"
        if self._keys is None or name in self._keys:
            return name
        # Checkpoints saved without the base-model prefix (e.g. original GPT-2: "h.3.mlp.c_proj.weight").
        matches = [k for k in self._keys if name.endswith("." + k)]
        if len(matches) != 1:
            raise MemitError(f"cannot find the checkpoint weight for {name!r} (candidates: {matches or 'none'})")
        return matches[0]

    def check_layers(self, layers: list[int]) -> None:
        bad = [l for l in layers if not 0 <= l < self.n_layers]
        if bad or not layers:
            raise MemitError(f"layers {bad or layers} out of range: this model has layers 0..{self.n_layers - 1}")
        if sorted(set(layers)) != list(layers):
            raise MemitError(f"layers {layers} must be distinct and increasing")

    def to_checkpoint_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A (d_model, d_ff) update in the weight's own layout."""
        return delta.T.contiguous() if self.spec.conv1d else delta

    @torch.no_grad()
    def add_to_weight(self, layer: int, delta: torch.Tensor) -> None:
        w = self.down_proj(layer).weight
        w += self.to_checkpoint_layout(delta).to(w.dtype)
