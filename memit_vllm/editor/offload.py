"""A model dispatched by accelerate (`make-patch --device-map`) as the editor reads and writes it.

Every use the editor makes of accelerate's internals is here, with the version it was tested on
(`check_accelerate`). A dispatched module computes on its hook's execution device; an offloaded one
(to CPU RAM beside GPUs, or to disk) holds meta tensors and loads its weights from the hook's weights
map before each forward. So the editor:
- puts each layer's work where that layer computes (`execution_device`);
- reads a weight through the weights map and writes an updated one into it (`read_weight`,
  `write_weight`): the new tensor is kept in CPU RAM, which the map reads before the files, and the
  checkpoint and the offload folder are never written;
- lets autograd keep no offloaded weight between the z forward and its backward (`weights_reread`):
  the backward loads it again, so the layers above the edited ones need not fit in memory at once.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..core.versions import untested
from ..errors import MemitError

TESTED_ACCELERATE = ">=1.15,<1.16"


def check_accelerate() -> None:
    """Refuse a missing accelerate, or a release outside TESTED_ACCELERATE (MEMIT_VLLM_ALLOW_UNTESTED=1 overrides)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("accelerate")
    except PackageNotFoundError:
        installed = None
    why = untested("accelerate", installed, TESTED_ACCELERATE, f"accelerate{TESTED_ACCELERATE}")
    if why:
        raise MemitError(f"--device-map: {why}")


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))  # a SequentialHook chains several


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else that of its first parameter
    that holds data (an undispatched model), else the CPU."""
    for hook in _hooks(module):
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _offload_hook(module: nn.Module):
    """The hook that loads `module`'s own tensors before each forward, or None (they stay in the module)."""
    return next((h for h in _hooks(module) if getattr(h, "offload", False) and h.weights_map is not None), None)


def read_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor `module.<name>` computes with (loaded from the weights map when offloaded)."""
    hook = _offload_hook(module)
    return getattr(module, name) if hook is None else hook.weights_map[name]


@torch.no_grad()
def write_weight(module: nn.Module, value: torch.Tensor, name: str = "weight") -> None:
    """Set `module.<name>` to `value` (rounded to the parameter's dtype): in place, or for an offloaded
    module as the entry of its weights map that every later forward loads (in CPU RAM)."""
    param = getattr(module, name)
    hook = _offload_hook(module)
    if hook is None:
        param.copy_(value)
        return
    store, key = _mapping(hook.weights_map, name)
    store[key] = value.to("cpu", param.dtype)


def _mapping(weights_map, key: str) -> tuple[dict, str]:
    """The dict under an accelerate weights map where `key` may be set, and the key there."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    while isinstance(weights_map, PrefixedDataset):
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    if isinstance(weights_map, OffloadedWeightsLoader):
        return weights_map.state_dict, key  # read before the index of files
    if isinstance(weights_map, dict):
        return weights_map, key
    raise MemitError(f"cannot update an offloaded weight held in a {type(weights_map).__name__}: this accelerate "
                     f"release differs from the tested {TESTED_ACCELERATE}")


def weights_reread(model: nn.Module):
    """A block within which autograd saves no weight of an offloaded module: it notes where the weight came
    from and loads it again for the backward. A no-op context for a model with no offloaded module."""
    owners = [(m, name, hook) for m in model.modules() if (hook := _offload_hook(m)) is not None
              for name, p in m._parameters.items() if p is not None]
    if not owners:
        return nullcontext()
    return _rereading(owners)


@contextmanager
def _rereading(owners: list):
    def pack(t: torch.Tensor):
        if t.device.type == "meta":
            return t
        ptr = t.untyped_storage().data_ptr()
        for module, name, hook in owners:  # only a module inside its forward holds a loaded weight
            p = module._parameters.get(name)
            if (p is not None and p.device.type != "meta" and p.is_contiguous()
                    and p.untyped_storage().data_ptr() == ptr):
                # the saved tensor may be a view of the weight (a transpose): kept as size, stride and offset
                return hook, name, t.device, t.dtype, t.size(), t.stride(), t.storage_offset() - p.storage_offset()
        return t

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        hook, name, device, dtype, size, stride, offset = saved
        return hook.weights_map[name].to(device, dtype).contiguous().as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
