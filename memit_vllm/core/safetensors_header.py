"""Reading the header of an untrusted safetensors file (a patch, a stats file) at a bounded cost.

The header is parsed by safetensors itself (the same accept/reject as every reader of the file), after
a scan that bounds its cost: JSON of many tiny entries takes ~12x its size in memory to parse. Our files'
headers are a few metadata strings and a few entries per tensor.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

MAX_HEADER_STRINGS = 40_000  # JSON strings in the header: ~4 per metadata field, 10 per tensor
MAX_HEADER_STRUCTURE = 1 << 20  # header bytes outside its strings
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


class HeaderError(ValueError):
    """Why a file is not a readable safetensors file; callers say which file and what kind."""


def safetensors_reason(e: Exception) -> str:
    """safetensors' message without what it quotes from the file (a refused file's bytes stay out of
    every answer)."""
    text = re.sub(r"`[^`]*`|\"[^\"]*\"|'[^']*'|\([^)]*\)", "...", str(e))
    return text.removeprefix("Error while deserializing header: ")


def _check_structure(raw: bytes, kind: str) -> None:
    outside, at = 0, 0
    for i, m in enumerate(_JSON_STRING.finditer(raw)):
        outside += m.start() - at
        at = m.end()
        if i >= MAX_HEADER_STRINGS or outside > MAX_HEADER_STRUCTURE:
            break
    else:
        if outside + len(raw) - at <= MAX_HEADER_STRUCTURE:
            return
    raise HeaderError(f"header has more entries than {kind} holds (at most {MAX_HEADER_STRINGS} JSON strings "
                      f"and {MAX_HEADER_STRUCTURE} bytes outside them)")


def read_header(path: Path, max_bytes: int, kind: str) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """(metadata, tensor name -> (dtype, shape)), checked as strictly as safetensors checks it, so lazy
    tensor reads cannot fail later. `kind` names what the file should be ("a patch") in messages."""
    with open_checked(path, max_bytes, kind) as (meta, tensors, _):
        return meta, tensors


@contextmanager
def open_checked(path: Path, max_bytes: int, kind: str) -> Iterator[tuple[dict, dict, object]]:
    """read_header's (metadata, tensors), with the safe_open handle they were read from, for a reader
    that reads tensors too without opening the file again."""
    try:
        str(path).encode("utf-8")  # what safe_open takes: it refused a valid file as "not a valid safetensors file"
    except UnicodeEncodeError as e:
        raise HeaderError("its path is not UTF-8 text, and safetensors opens no other: rename it") from e
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"{size} bytes is too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > max_bytes:
            raise HeaderError(f"not a safetensors file, or a header over {max_bytes} bytes")
        if 8 + n > size:
            raise HeaderError(f"not a safetensors file, or truncated (its header does not fit its {size} bytes)")
        _check_structure(f.read(n), kind)
    with ExitStack() as stack:
        try:
            f = stack.enter_context(safe_open(path, "pt"))
            meta = f.metadata() or {}
            tensors = {name: (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise HeaderError(f"not a valid safetensors file ({safetensors_reason(e)}); truncated or modified?") from e
        yield meta, tensors, f
