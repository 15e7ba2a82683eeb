"""Reading the patch list out of vLLM's `model_loader_extra_config`, and describing patches for humans.

Shared by the loader (engine side) and the HTTP route (API server side), which see the same config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from memit_vllm.core.architectures import by_class
from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY
from memit_vllm.patch import Patch, PatchError, load_patch


def patch_paths(extra_config: Mapping) -> list[str]:
    """`{"patches": ["a.patch", ...]}`; a single string is one patch (the dotted CLI form gives one).
    An explicit empty list serves the base model (patches can then be applied at run time)."""
    paths = extra_config.get(PATCHES_KEY)
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise PatchError(f'load format {LOAD_FORMAT} needs model_loader_extra_config {{"{PATCHES_KEY}": '
                         f'["file.patch", ...]}}, got {dict(extra_config)!r}')
    return paths


def load_patches(extra_config: Mapping) -> list[Patch]:
    return [load_patch(p) for p in patch_paths(extra_config)]


def file_state(path) -> list[int]:
    """What changes when a file's bytes do (device, inode, size, modification time in ns): a kept patch
    copy found in the state it was verified in is not hashed again (a list: it crosses collective_rpc)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def describe(patch: Patch) -> dict:
    """What a server reports about a patch to anyone: identity, size, lineage and where in the model it
    acts; not where its file is (server paths are for admins: GET /memit/patches?paths=true)."""
    arch = by_class(patch.base.architecture)
    layers = sorted({layer for n in patch.deltas if (layer := arch.layer_of(n)) is not None})
    return {"id": patch.patch_id, "name": patch.name, "version": patch.version, "facts": len(patch.requests),
            "layers": layers, "weights": sorted(patch.deltas), "made_on": patch.made_on}
