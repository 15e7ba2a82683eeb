"""vLLM plugin of memit-vllm: the `memit` load format (patches merged while the model loads) and the
`/memit/patches` route. The only package of this project that imports vllm.

`register` is the `vllm.general_plugins` entry point. vLLM calls it in every process (API server,
engine core, workers), possibly more than once per process, so it only registers what is missing.
"""

from __future__ import annotations

LOAD_FORMAT = "memit"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from .loader import MemitModelLoader

    register_model_loader(LOAD_FORMAT)(MemitModelLoader)
    _registered = True
