"""Reading the patch list out of vLLM's `model_loader_extra_config`, and describing patches for humans.

Shared by the loader (engine side) and the HTTP route (API server side), which see the same config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from safetensors import safe_open

from memit_vllm.patch import Patch, PatchError, load_patch

PATCHES_KEY = "patches"
_LAYER = re.compile(r"\.(\d+)\.")


def patch_paths(extra_config: Mapping) -> list[str]:
    """`{"patches": ["a.patch", ...]}`; a single string is one patch (the dotted CLI form gives one).
    An explicit empty list serves the base model (patches can then be applied at run time)."""
    paths = extra_config.get(PATCHES_KEY)
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise PatchError(f'load format memit needs model_loader_extra_config {{"{PATCHES_KEY}": ["file.patch", ...]}}, '
                         f"got {dict(extra_config)!r}")
    return paths


def load_patches(extra_config: Mapping) -> list[Patch]:
    return [load_patch(p) for p in patch_paths(extra_config)]


def describe(patch: Patch) -> dict:
    """What a server reports about a patch: identity, size, and where in the model it acts."""
    layers = sorted({int(m.group(1)) for n in patch.deltas if (m := _LAYER.search(n))})
    return {"id": recorded_id(patch), "name": patch.name, "version": patch.version, "facts": len(patch.requests),
            "layers": layers, "weights": sorted(patch.deltas), "path": str(patch.path)}


def recorded_id(patch: Patch) -> str:
    """The id written in the file's header: re-hashing every delta (`Patch.patch_id`) would cost a
    second full read of the patch at each server start."""
    if patch.path is None:
        return patch.patch_id
    with safe_open(patch.path, "pt") as f:
        return f.metadata()["patch_id"]
