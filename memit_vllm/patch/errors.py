"""Every way a patch file can be wrong, as one family: callers catch PatchError, users read the message."""

from ..errors import MemitError


class PatchError(MemitError):
    """Base class of all patch-format errors."""


class CorruptPatchError(PatchError):
    """The file is truncated, its header is not valid JSON, or its byte ranges do not add up."""


class NotAPatchError(PatchError):
    """A valid safetensors file that is not a memit-vllm patch (a checkpoint, a LoRA, ...)."""


class UnsupportedVersionError(PatchError):
    """The patch was written by a newer format version than this tool reads."""


class MissingMetadataError(PatchError):
    """A required metadata field is absent or not valid JSON."""


class BaseMismatchError(PatchError):
    """The patch was made for different base weights than the ones it is applied to."""


class ShapeMismatchError(PatchError):
    """A delta's shape or dtype does not match the weight it applies to."""


class NonFiniteError(PatchError):
    """A delta holds NaN or Inf."""


class LineageError(PatchError):
    """A patch made on a stack (`make-patch --on`) is given without that stack, or in another order,
    or a patch is given twice."""
