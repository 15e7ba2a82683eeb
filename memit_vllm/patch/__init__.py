"""The patch format: the contract between the offline editor and the serving side. No vLLM here.

Names are exported lazily (PEP 562), so importing this package (the CLI does) does not import torch.
"""

from .errors import (BaseMismatchError, CorruptPatchError, LineageError, MissingMetadataError, NonFiniteError,
                     NotAPatchError, PatchError, ShapeMismatchError, UnsupportedVersionError)

_FROM_FORMAT = ("FORMAT_NAME", "FORMAT_VERSION", "BaseModel", "Patch", "load_patch")

__all__ = [
    *_FROM_FORMAT, "PatchError", "CorruptPatchError", "NotAPatchError", "UnsupportedVersionError",
    "MissingMetadataError", "BaseMismatchError", "ShapeMismatchError", "NonFiniteError", "LineageError",
]


def __getattr__(name: str):
    if name in _FROM_FORMAT:
        from . import format

        return getattr(format, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
