"""Worker side of hot apply/revert: reload the touched weights as base + active patches, and report
what the served weights hash to.

Installed with `--worker-extension-cls` (`memit-vllm serve` sets it); the API server reaches these
methods through `collective_rpc`. Every new weight is computed from the checkpoint's own bytes before
the model is touched, so a bad patch or an unreadable checkpoint changes nothing, and a weight that no
active patch touches any more is the checkpoint tensor itself: revert is bit-exact, not W + d - d.
"""

from __future__ import annotations

from torch import nn

from memit_vllm.checkpoint import Checkpoint, tensor_fingerprint
from memit_vllm.core.architectures import Architecture, by_class
from memit_vllm.patch import PatchError, load_patch
from memit_vllm.patch.format import where
from memit_vllm.patch.merge import PatchSet

from .compat import reload_layers, whole_weight
from .patches import file_state


def served_module(model: nn.Module, arch: Architecture, name: str) -> nn.Module:
    """The vLLM module holding checkpoint weight `name`: the table's module path of its layer (vLLM may
    add or drop a leading prefix)."""
    layer = arch.layer_of(name)
    if layer is None:
        raise PatchError(f"{name!r} is not an MLP down-projection of {arch.hf_class}")
    path = arch.module_name(layer)
    matches = [m for n, m in model.named_modules()
               if n and (n == path or n.endswith("." + path) or path.endswith("." + n))]
    if len(matches) != 1:
        raise PatchError(f"cannot find the served module of weight {name!r} ({len(matches)} candidates)")
    return matches[0]


class MemitWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def _memit_served_modules(self, ckpt: Checkpoint, names: list[str]) -> list[nn.Module]:
        arch = by_class(ckpt.architecture)
        model = self.get_model()
        return [served_module(model, arch, n) for n in names]

    def memit_reload(self, patch_paths: list[str], patch_ids: list[str], states: list[list[int] | None],
                     names: list[str], base_fingerprints: dict[str, str]) -> None:
        """Make each weight in `names` equal base + the deltas of the given patches (in order). A patch
        with a state (patches.file_state) was verified by the server in that state: found unchanged, it is
        not hashed again (this runs while requests are held); one without is verified here. A weight no
        patch touches any more is reloaded only if the checkpoint still holds its base bytes."""
        ckpt = Checkpoint(self.model_config.model)
        patches = [load_patch(p) for p in patch_paths]
        for p, expected, state in zip(patches, patch_ids, states):
            if p.patch_id != expected or (state is not None and file_state(p.path) != state):
                raise PatchError(f"{where(p.path)} changed on disk after it was validated (patch {expected})")
            if state is not None:
                p.verified_elsewhere()
        stack = PatchSet(patches, dtype=self.model_config.dtype) if patches else None
        weights = []
        for n in names:
            base = ckpt.tensor(n)
            if stack and stack.touches(n):
                weights.append((n, stack.merge(n, base)))
            elif tensor_fingerprint(base) != base_fingerprints[n]:
                raise PatchError(f"the checkpoint's weight {n!r} changed on disk; refusing to serve it as the base")
            else:
                weights.append((n, base))
        reload_layers(self, self._memit_served_modules(ckpt, names), weights)

    def memit_weight_hashes(self, names: list[str]) -> dict[str, str]:
        """tensor_fingerprint of each served weight in the checkpoint's layout, comparable with a patch's
        base_weights (when served in the checkpoint's dtype); under tensor parallelism the whole weight,
        assembled from every rank's slice on rank 0, whose answer covers all ranks (the others answer {})."""
        ckpt = Checkpoint(self.model_config.model)
        out = {}
        for n, module in zip(names, self._memit_served_modules(ckpt, names)):
            w = whole_weight(module)
            if w is not None:
                shape = ckpt.shape(n)
                out[n] = tensor_fingerprint(w if tuple(w.shape) == shape else w.t())  # Conv1D: stored [in, out]
        return out
