"""Worker side of hot apply/revert: reload the touched weights as base + active patches, and report
what the served weights hash to.

Installed with `--worker-extension-cls` (`memit-vllm serve` sets it); the API server reaches these
methods through `collective_rpc`. Every new weight is computed from the checkpoint's own bytes before
the model is touched, so a bad patch or an unreadable checkpoint changes nothing, and a weight that no
active patch touches any more is the checkpoint tensor itself: revert is bit-exact, not W + d - d.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import set_current_vllm_config
from vllm.model_executor.model_loader.reload.layerwise import (finalize_layerwise_reload,
                                                                initialize_layerwise_reload)

from memit_vllm.checkpoint import Checkpoint, tensor_fingerprint
from memit_vllm.patch import PatchError, load_patch
from memit_vllm.patch.merge import PatchSet


def served_module(model: nn.Module, name: str) -> nn.Module:
    """The vLLM module holding checkpoint weight `name` (vLLM may add or drop a leading prefix)."""
    hf_module = name.removesuffix(".weight")
    matches = [m for n, m in model.named_modules()
               if n and (n == hf_module or n.endswith("." + hf_module) or hf_module.endswith("." + n))]
    if len(matches) != 1:
        raise PatchError(f"cannot find the served module of weight {name!r} ({len(matches)} candidates)")
    return matches[0]


@torch.no_grad()
def served_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module multiplies by, [out, in] in the served dtype. On CPU vLLM repacks linear
    weights for oneDNN and empties `weight`; then the layer is run on the identity matrix, which gives
    the weight back exactly (every output element is one product with 1.0 plus exact zeros)."""
    if module.weight.numel():
        return module.weight.detach()
    eye = torch.eye(module.input_size_per_partition, dtype=module.params_dtype)
    return module.quant_method.apply(module, eye).t().contiguous()


class MemitWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def memit_reload(self, patch_paths: list[str], patch_ids: list[str], names: list[str]) -> None:
        """Make each weight in `names` equal base + the deltas of the given patches (in order)."""
        ckpt = Checkpoint(self.model_config.model)
        patches = [load_patch(p, verify_content=True) for p in patch_paths]
        for p, expected in zip(patches, patch_ids):
            if p.patch_id != expected:
                raise PatchError(f"{p.path} changed on disk after it was validated ({p.patch_id} != {expected})")
        stack = PatchSet(patches) if patches else None
        weights = [(n, stack.merge(n, ckpt.tensor(n)) if stack and stack.touches(n) else ckpt.tensor(n))
                   for n in names]
        model = self.model_runner.get_model()
        modules = [served_module(model, n) for n in names]
        # vLLM's layer-wise reload, limited to the touched layers: each is reset to its checkpoint layout,
        # loaded through the model's own load_weights (renaming, Conv1D transposes, TP slicing) and
        # post-processed again (CPU repacking), then copied into the storage the kernels already use.
        with set_current_vllm_config(self.vllm_config):
            for m in modules:
                initialize_layerwise_reload(m)
            model.load_weights(iter(weights))
            for m in modules:
                finalize_layerwise_reload(m, self.model_config)

    def memit_weight_hashes(self, names: list[str]) -> dict[str, str]:
        """tensor_fingerprint of each served weight in the checkpoint's layout, comparable with a patch's
        base_weights (when served in the checkpoint's dtype)."""
        ckpt = Checkpoint(self.model_config.model)
        model = self.model_runner.get_model()
        out = {}
        for n in names:
            w = served_weight(served_module(model, n))
            shape = ckpt.shape(n)
            out[n] = tensor_fingerprint(w if tuple(w.shape) == shape else w.t())  # Conv1D: stored [in, out]
        return out
