"""The `memit` load format: vLLM's default loader, with each patch's delta added to its weight in flight.

Deltas are added to the (HF checkpoint name, full tensor) pairs that the default loader streams, before
the model's own `load_weights` sees them. So vLLM still does the renaming, fused-layer packing, Conv1D
transposes and tensor-parallel slicing, and at most one patched weight is held twice (fp32) at a time.

Every check that can fail without reading the patched weights (quantized checkpoint, architecture,
missing tensor names) runs before the first weight is yielded; fingerprint and shape are checked per
weight as it streams by; a patched weight that never streams by fails the load at the end. Any failure
raises, which stops the engine, so a half-patched model is never served.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Generator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import DefaultModelLoader

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.contract import PATCHES_KEY, refuse_quantized
from memit_vllm.errors import MemitError
from memit_vllm.patch import PatchError
from memit_vllm.patch.merge import PatchSet

from .compat import logger, weight_files
from .patches import describe, load_patches


class MemitLoadError(RuntimeError):
    """A patch cannot be applied to the model being loaded; the server must not start."""


class MemitModelLoader(DefaultModelLoader):
    def __init__(self, load_config: LoadConfig):
        extra = dict(load_config.model_loader_extra_config or {})
        try:
            patches = load_patches(extra)
            self.patches = PatchSet(patches) if patches else None  # none: the base, for hot apply later
        except MemitError as e:
            raise MemitLoadError(f"memit-vllm: {e}") from e
        # The parent accepts only its own extra-config keys and known load formats.
        extra.pop(PATCHES_KEY)
        parent_config = copy.copy(load_config)
        parent_config.load_format = "auto"
        parent_config.model_loader_extra_config = extra
        super().__init__(parent_config)

    def get_all_weights(self, model_config: ModelConfig,
                        model: nn.Module) -> Generator[tuple[str, torch.Tensor], None, None]:
        if self.patches is None:
            yield from super().get_all_weights(model_config, model)
            return
        # Our own time (checks + merging), excluding vLLM's reading and loading: the cost of a patch.
        start = time.perf_counter()
        self.patches.dtype = model_config.dtype  # merged weights must be finite in the dtype they are served in
        try:
            self._check_before_loading(model_config)
            for p in self.patches.patches:
                info = describe(p)
                logger.info("memit patch %s: name=%r version=%r facts=%d layers=%s (%s)", info["id"], info["name"],
                            info["version"], info["facts"], info["layers"], p.path)
            seen = set()
            spent = time.perf_counter() - start
            for name, tensor in super().get_all_weights(model_config, model):
                if self.patches.touches(name):
                    start = time.perf_counter()
                    tensor = self.patches.merge(name, tensor)
                    spent += time.perf_counter() - start
                    seen.add(name)
                yield name, tensor
            unseen = [n for n in self.patches.names if n not in seen]
            if unseen:
                raise PatchError(f"weight {unseen[0]!r} (and {len(unseen) - 1} more patched weights) never streamed "
                                 "from the checkpoint, so the patch could not be applied")
        except MemitError as e:
            raise MemitLoadError(f"memit-vllm: {e}; refusing to serve a model without its patches") from e
        logger.info("memit: merged %d patch(es) into %d weights; checks and merging took %.3f seconds",
                    len(self.patches.patches), len(seen), spent)

    def _check_before_loading(self, model_config: ModelConfig) -> None:
        hf_config = model_config.hf_config
        refuse_quantized(hf_config.to_dict())
        folder, files, use_safetensors = weight_files(self, model_config)
        if not use_safetensors:
            raise PatchError(f"{model_config.model} has no safetensors weights; patches bind to safetensors "
                             "checkpoints (the base weights they were made for)")
        # The architecture as the editor read it from config.json: vLLM rewrites a missing `architectures`.
        config = Path(folder) / "config.json"
        if config.is_file():
            self.patches.check_model(Checkpoint(folder).architecture)
        else:  # a hub model fetched with --download-dir has only its weights there
            self.patches.check_model((hf_config.architectures or [hf_config.model_type])[0])
        names = set()
        for f in files:
            with safe_open(f, "pt") as st:
                names.update(st.keys())
        self.patches.check_names(names)

