"""The MEMIT editor: from edit requests and a checkpoint to a patch. Imports nothing of vLLM."""

from .hparams import HParams
from .memit import EditResult, edit, make_patch
from .requests import EditRequest, load_requests

__all__ = ["HParams", "EditRequest", "EditResult", "edit", "make_patch", "load_requests"]
