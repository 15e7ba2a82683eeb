"""The patch format: the contract between the offline editor and the serving side. No vLLM here."""

from .errors import (BaseMismatchError, CorruptPatchError, MissingMetadataError, NonFiniteError,
                     NotAPatchError, PatchError, ShapeMismatchError, UnsupportedVersionError)
from .format import FORMAT_NAME, FORMAT_VERSION, BaseModel, Patch, load_patch

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "BaseModel", "Patch", "load_patch", "PatchError", "CorruptPatchError",
    "NotAPatchError", "UnsupportedVersionError", "MissingMetadataError", "BaseMismatchError",
    "ShapeMismatchError", "NonFiniteError",
]
