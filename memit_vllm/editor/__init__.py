"""The MEMIT editor: from edit requests and a checkpoint to a patch. Imports nothing of vLLM, and torch
only when a name that needs it is first used (the CLI imports `editor.command` at every start)."""

from importlib import import_module

from ..core.records import EditRequest, load_requests, parse_record, validate_requests
from .hparams import HParams, default_hparams, parse_layers

_LAZY = {"EditConfig": "memit", "EditReport": "memit", "EditResult": "memit", "edit": "memit",
         "make_patch": "memit", "EditableModel": "arch", "load_editable": "arch",
         "solve_layer_update": "solve"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EditRequest", "load_requests", "parse_record", "validate_requests", "HParams", "default_hparams",
           "parse_layers", *_LAZY]
