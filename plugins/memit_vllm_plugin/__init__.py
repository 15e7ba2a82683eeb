"""vLLM plugin of memit-vllm: the `memit` load format (patches merged while the model loads) and the
`/memit/patches` route. The only package of this project that imports vllm (its internals: `compat`).

`register` is the `vllm.general_plugins` entry point. vLLM calls it in every process (API server,
engine core, workers), possibly more than once per process, so it only registers what is missing.
"""

from __future__ import annotations

from memit_vllm.core.contract import LOAD_FORMAT

from .compat import logger, untested_vllm

_registered = False


def register() -> None:
    """Register the load format. On a vLLM outside the tested range, say why in one line and register
    nothing: vLLM runs in every process that merely has memit-vllm installed, and must keep working."""
    global _registered
    if _registered:
        return
    why = untested_vllm()
    if why:
        logger.error("memit-vllm: %s; the %r load format is not registered", why, LOAD_FORMAT)
    else:
        from vllm.model_executor.model_loader import register_model_loader

        from .loader import MemitModelLoader

        register_model_loader(LOAD_FORMAT)(MemitModelLoader)
    _registered = True
