"""A loaded causal LM as MEMIT edits it: the down-projections of the architecture table
(memit_vllm.core.architectures), their shapes, and their checkpoint names."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..compat import load_causal_lm, output_logits
from ..core.architectures import by_config
from ..core.tokens import ensure_pad_token
from ..errors import MemitError
from .hparams import FORWARD_DTYPES
from .offload import execution_device, read_weight, write_weight


class EditableModel:
    """A causal LM seen as MEMIT needs it: layers, down-projections, their checkpoint names."""

    def __init__(self, model: nn.Module, checkpoint_keys: list[str] | None = None):
        self.model = model
        self.arch = by_config(model.config.to_dict())
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

    def device_of(self, layer: int) -> torch.device:
        """Where layer `layer`'s down-projection computes (under a device map, each layer on its own device):
        its keys, covariance and update live there."""
        return execution_device(self.down_proj(layer))

    @property
    def output_device(self) -> torch.device:
        """Where the logits are computed: the z optimisation's loss, and the editor's default device under a
        device map."""
        return execution_device(self.model.get_output_embeddings())

    def weight(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s down-projection weight (loaded, when a device map offloaded it)."""
        return read_weight(self.down_proj(layer))

    def param_name(self, layer: int) -> str:
        """The checkpoint key of layer `layer`'s down-projection weight."""
        if self._keys is None:
            return self.arch.weight_name(layer)
        return self.arch.checkpoint_name(layer, self._keys)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from its final hidden states (the head and any scaling after it)."""
        return output_logits(self.model, hidden)

    def to_checkpoint_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A (d_model, d_ff) update in the weight's own layout."""
        return delta.T.contiguous() if self.arch.conv1d else delta

    @torch.no_grad()
    def to_output_space(self, layer: int, z_layer: int, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """R [d_model, n], changes wanted in layer `z_layer`'s output at the keys K [d_ff, n], as the changes of
        layer `layer`'s down-projection output that reach it along the residual stream. MEMIT takes them to be
        equal; where the architecture scales or normalises that path (table: post_mlp_norm, mlp_scale,
        stream_scale) they are not, and an unmapped update delivers a fraction of its residual."""
        arch, block, device = self.arch, self.layers[layer], self.device_of(layer)
        scale = float(getattr(block, arch.mlp_scale)) if arch.mlp_scale else 1.0
        if arch.stream_scale:
            for m in range(layer, z_layer + 1):
                scale *= float(getattr(self.layers[m], arch.stream_scale))
        R = R / scale
        if arch.post_mlp_norm:
            # An RMS norm n(o) = g * o / r(o), r = sqrt(mean(o^2) + eps): to first order a change dc of n(o)
            # needs do = r * dc / g; the part of dc along n(o) it cannot make (only eps lets the norm's output
            # grow) and is not asked for. g = n(1, ..., 1) (eps is negligible there); r = |g o| / |n(o)|.
            norm = block.get_submodule(arch.post_mlp_norm)
            dtype = self.down_proj(layer).weight.dtype
            o = self.down_proj(layer)(K.T.to(device, dtype))  # [n, d_model] the outputs now
            g = norm(torch.ones(1, o.shape[1], dtype=dtype, device=device))[0].double().to(R.device)
            r = (g * o.double().to(R.device)).norm(dim=1) / norm(o).double().to(R.device).norm(dim=1)
            inv_g = torch.where(g.abs() > 1e-6 * g.abs().max(), 1 / g, torch.zeros_like(g))
            R = R * inv_g[:, None] * r[None, :]
        return R

    @torch.no_grad()
    def add_to_weight(self, layer: int, delta: torch.Tensor) -> None:
        """W + delta, added in fp32 and rounded once to the weight's dtype, as a merge serves it."""
        w = self.weight(layer)
        self.set_weight(layer, w.float() + self.to_checkpoint_layout(delta).to(w.device, torch.float32))

    def set_weight(self, layer: int, value: torch.Tensor) -> None:
        """Layer `layer`'s down-projection weight := `value` (checkpoint layout), rounded to its dtype."""
        write_weight(self.down_proj(layer), value)


def model_dtype(ckpt: Checkpoint, dtype: str | None = None) -> str:
    """The dtype the editor loads `ckpt` in: `dtype`, else the checkpoint's own (never an fp32 copy of a
    bf16 model: what needs more precision is kept apart, in fp32/float64)."""
    chosen = dtype or ckpt.dtype
    if chosen not in FORWARD_DTYPES:
        source = "--dtype" if dtype else f"{ckpt.path}'s dtype"
        raise MemitError(f"{source} {chosen!r}: the editor loads models in {', '.join(FORWARD_DTYPES)}; pass --dtype")
    return chosen


def load_editable(model: str | Path | Checkpoint, dtype: str | None = None, **placement):
    """(tokenizer, EditableModel) of a checkpoint as the editor uses them: in `model_dtype`, eval mode,
    weights frozen, a pad token (batched sampling pads; many Llama tokenizers define none). `placement`:
    a device map and offload folder (devicemap.Placement.load_kwargs)."""
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint(model)
    tok, hf = load_causal_lm(ckpt.path, getattr(torch, model_dtype(ckpt, dtype)), **placement)
    ensure_pad_token(tok)
    for p in hf.parameters():
        p.requires_grad_(False)
    return tok, EditableModel(hf, ckpt.keys())


def checkpoint_dims(ckpt: Checkpoint) -> tuple[str, int, int]:
    """(model_type, number of layers, d_ff) read from the checkpoint's config and weight shapes, without
    loading the model: the hyperparameters are resolved and checked before the heavy work."""
    model_type = ckpt.config.get("model_type", "?")
    arch = by_config(ckpt.config)
    keys = ckpt.keys()
    layers = {arch.layer_of(k) for k in keys} - {None}
    if not layers:
        raise MemitError(f"{ckpt.path} holds no {arch.down_proj} weights: not a {model_type} checkpoint")
    shape = ckpt.shape(arch.checkpoint_name(min(layers), keys))
    return model_type, max(layers) + 1, shape[0] if arch.conv1d else shape[1]


def check_layers(layers: list[int], n_layers: int, config: dict | None = None) -> None:
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise MemitError(f"layers {bad or layers} out of range: this model has layers 0..{n_layers - 1}")
    if sorted(set(layers)) != list(layers):
        raise MemitError(f"layers {layers} must be distinct and increasing")
    sources = kv_source_layers(config or {})
    if sources and layers[-1] >= min(sources):
        raise MemitError(f"layers {layers}: the top layers of this model reuse the keys/values of layers {sources}, "
                         f"and the editor runs the model from above its last edited layer; edit layers below "
                         f"{min(sources)}")


def kv_source_layers(config: dict) -> list[int]:
    """The layers whose keys/values later layers reuse (Gemma 4's `num_kv_shared_layers`): the last layer of
    each attention type below the first sharing layer, as transformers picks them."""
    shared = config.get("num_kv_shared_layers") or 0
    if not shared:
        return []
    below = config["layer_types"][: config["num_hidden_layers"] - shared]
    return sorted(max(i for i, t in enumerate(below) if t == kind) for kind in set(below))
