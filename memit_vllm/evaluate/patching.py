"""Load an HF model for evaluation and merge patches into it in memory.

Patches bind to the checkpoint's bytes, so each delta is merged against the tensor read from the
checkpoint files (not the in-memory parameter, whose dtype may differ) by the same
`PatchSet.merge` the vLLM loader uses, then copied into the model's parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..patch import BaseMismatchError, Patch, ShapeMismatchError, load_patch
from ..patch.merge import PatchSet


def resolve_model(model: str) -> Checkpoint:
    """A checkpoint dir, an HF hub id, or the name of a default model (e.g. smollm2-135m)."""
    from ..default_models import KNOWN_MODELS, prepare

    return Checkpoint(prepare(model) if model in KNOWN_MODELS and not Path(model).exists() else model)


def load_model(checkpoint: Checkpoint, device: str = "cpu"):
    """The fp32 model in eval mode and its tokenizer: scores are compared across runs, so no half precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def load_patches(paths: Sequence[str | Path]) -> list[Patch]:
    return [load_patch(p) for p in paths]


def _parameter(model, name: str) -> torch.nn.Parameter:
    """The in-memory parameter of a checkpoint weight name; checkpoints may omit or add the base prefix."""
    prefix = model.base_model_prefix + "."
    candidates = [name, name[len(prefix):] if name.startswith(prefix) else prefix + name]
    for candidate in candidates:
        try:
            return model.get_parameter(candidate)
        except AttributeError:
            continue
    raise BaseMismatchError(f"the model has no parameter for checkpoint weight {name!r}")


@torch.no_grad()
def apply_patches(model, checkpoint: Checkpoint, patches: Sequence[Patch]) -> None:
    """Set every patched parameter to checkpoint weight + deltas (one merge per weight, whole stack)."""
    stack = PatchSet(patches)
    stack.check_model(checkpoint.architecture)
    stack.check_names(set(checkpoint.keys()))
    for name in stack.names:
        merged = stack.merge(name, checkpoint.tensor(name))
        param = _parameter(model, name)
        if tuple(merged.shape) != tuple(param.shape):
            raise ShapeMismatchError(f"weight {name!r} is {tuple(merged.shape)} in the checkpoint but "
                                     f"{tuple(param.shape)} in the loaded model; cannot apply the patch")
        param.copy_(merged.to(param.dtype))


def patch_info(patch: Patch) -> dict:
    """What the report says about a patch: enough to find it again and know what it edits."""
    return {"patch_id": patch.patch_id, "name": patch.name, "version": patch.version,
            "path": str(patch.path) if patch.path else None, "edits": len(patch.requests),
            "weights": patch.layers}

