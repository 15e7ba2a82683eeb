"""Load an HF model for evaluation and merge patches into it in memory.

Patches bind to the checkpoint's bytes, so each delta is merged against the tensor read from the
checkpoint files (not the in-memory parameter, whose dtype may differ) by the same
`PatchSet.merge` the vLLM loader uses, then copied into the model's parameter. (`memit-vllm apply`,
patch.tools.apply_patches, writes a merged checkpoint directory instead.)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from ..checkpoint import Checkpoint
from ..core.architectures import by_class
from ..patch import Patch, ShapeMismatchError
from ..patch.merge import PatchSet


def load_model(checkpoint: Checkpoint, device: str = "cpu"):
    """The fp32 model in eval mode and its tokenizer: scores are compared across runs, so no half precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


@torch.no_grad()
def merge_into_model(model, checkpoint: Checkpoint, patches: Sequence[Patch]) -> dict[str, torch.Tensor]:
    """Set every patched parameter of the loaded `model` to checkpoint weight + deltas (one merge per
    weight, whole stack); return the replaced values (parameter name -> tensor), for `swapped`."""
    stack = PatchSet(patches)
    stack.check_model(checkpoint.architecture)  # every name is a down-projection of this architecture
    stack.check_names(set(checkpoint.keys()))
    arch = by_class(checkpoint.architecture)
    replaced = {}
    for name in stack.names:
        merged = stack.merge(name, checkpoint.tensor(name))
        param_name = arch.weight_name(arch.layer_of(name))
        param = model.get_parameter(param_name)
        if tuple(merged.shape) != tuple(param.shape):
            raise ShapeMismatchError(f"weight {name!r} is {tuple(merged.shape)} in the checkpoint but "
                                     f"{tuple(param.shape)} in the loaded model; cannot apply the patch")
        replaced[param_name] = param.detach().clone()
        param.copy_(merged.to(param.dtype))
    return replaced


@contextmanager
@torch.no_grad()
def swapped(model, values: dict[str, torch.Tensor]):
    """The parameters named in `values` set to them inside the block, and back after it: the unedited
    model next to the edited one without a second copy (only the patched weights are held twice)."""
    previous = {name: model.get_parameter(name).detach().clone() for name in values}
    for name, value in values.items():
        model.get_parameter(name).copy_(value)
    try:
        yield
    finally:
        for name, value in previous.items():
            model.get_parameter(name).copy_(value)


def patch_info(patch: Patch) -> dict:
    """What the report says about a patch: enough to find it again and know what it edits."""
    return {"patch_id": patch.patch_id, "name": patch.name, "version": patch.version,
            "path": str(patch.path) if patch.path else None, "edits": len(patch.requests),
            "weights": patch.layers}
