"""The patch file: a safetensors file of fp32 weight deltas plus the metadata that ties it to its base.

Tensors are keyed by HF checkpoint parameter names and stored in that parameter's checkpoint layout,
so `W_checkpoint + delta` is the edited weight. Metadata values are strings (safetensors' rule); the
structured ones hold JSON. The writer is our own (a few lines) so that the bytes are deterministic:
sorted header keys, no map-order randomness, identical patch for identical inputs.
See docs/patch-format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.files import atomic_file
from ..core.safetensors_header import HeaderError, read_header, safetensors_reason
from ..errors import MemitError
from .errors import (CorruptPatchError, MissingMetadataError, NonFiniteError, NotAPatchError,
                     PatchError, UnsupportedVersionError)

FORMAT_NAME = "memit-vllm.patch"
FORMAT_VERSION = 2  # the newest this reader reads; a file is written at the lowest version that holds it
LINEAGE_VERSION = 2  # version 2 added `made_on`: older readers must refuse a patch that needs its stack
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors limit

# metadata key -> does it hold JSON
_FIELDS = {
    "format": False, "format_version": False, "patch_id": False, "name": False, "version": False,
    "created": False, "tool_version": False, "base": True, "base_weights": True, "hparams": True,
    "covariance": True, "stats": True, "requests": True, "parents": True, "made_on": True,
}
# JSON field -> the type its value must have (checked on load, so consumers can trust it)
_JSON_TYPES = {"base": dict, "base_weights": dict, "hparams": dict, "covariance": dict, "stats": dict,
               "requests": list, "parents": list, "made_on": list}
_REQUIRED = ("format", "format_version", "patch_id", "base", "base_weights", "requests")


@dataclass(frozen=True)
class BaseModel:
    """Which model a patch applies to. The per-weight fingerprints are the binding check."""

    name_or_path: str
    architecture: str
    config_sha256: str

    def to_dict(self) -> dict:
        return {"name_or_path": self.name_or_path, "architecture": self.architecture,
                "config_sha256": self.config_sha256}


def _created_now() -> str:
    # SOURCE_DATE_EPOCH (the reproducible-builds convention) pins the timestamp, and with it the bytes.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


class _LazyTensors(Mapping):
    """Tensors of a patch on disk, read one at a time when asked for."""

    def __init__(self, path: Path, names: list[str]):
        self._path, self._names = path, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        try:
            with safe_open(self._path, "pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CorruptPatchError(f"{where(self._path)}: tensor {name!r} cannot be read "
                                    f"({safetensors_reason(e)})") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class Patch:
    """A set of weight deltas and what they mean. `deltas` may be lazy (read from disk on access)."""

    deltas: Mapping[str, torch.Tensor]
    base: BaseModel
    base_weights: dict[str, str]  # parameter name -> tensor_fingerprint of the base weight
    requests: list[dict]
    hparams: dict = field(default_factory=dict)
    covariance: dict = field(default_factory=dict)  # where C_l came from: corpus identity, token count
    stats: dict = field(default_factory=dict)
    name: str = ""
    version: str = ""
    parents: list[str] = field(default_factory=list)
    created: str = field(default_factory=_created_now)
    tool_version: str = ""
    path: Path | None = None  # where it was loaded from, if anywhere
    made_on: list[str] = field(default_factory=list)  # ids of the stack it was computed on, in order
    # Computed on first use; set by load_patch to the recorded id. Not an init field, so a copy made with
    # dataclasses.replace (other content) computes its own.
    _patch_id: str | None = field(default=None, init=False, repr=False, compare=False)
    _verified: bool = field(default=False, init=False, repr=False, compare=False)  # Patch.verify() passed

    def __post_init__(self):
        if not self.tool_version:
            from .. import __version__

            self.tool_version = __version__

    # -- identity -----------------------------------------------------------------------------
    @property
    def format_version(self) -> int:
        """1 for a patch made on the bare base; 2 for one made on a stack (readers of version 1 would
        serve it without that stack, so they must refuse it)."""
        return LINEAGE_VERSION if self.made_on else 1

    def _content_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME, "format_version": str(self.format_version), "name": self.name,
            "version": self.version, "tool_version": self.tool_version, "base": self.base.to_dict(),
            "base_weights": self.base_weights, "hparams": self.hparams, "covariance": self.covariance,
            "stats": self.stats, "requests": self.requests, "parents": self.parents,
        }
        if self.made_on:  # absent otherwise, so the ids of version-1 patches are unchanged
            meta["made_on"] = self.made_on
        return {k: json.dumps(v, sort_keys=True) if _FIELDS[k] else v for k, v in meta.items()}

    @property
    def patch_id(self) -> str:
        """Content hash over tensors (as stored: fp32) and metadata, not the creation time: same content,
        same id, before and after a save. Computed once; a patch loaded from a file reports the id its
        header records (load_patch(verify_content=True) recomputes it and refuses a mismatch)."""
        if self._patch_id is None:
            self._patch_id = self.content_id()
        return self._patch_id

    def content_id(self, check=None) -> str:
        """The id recomputed from the content (reads every delta; `check(name, tensor)` sees each one read)."""
        h = hashlib.sha256()
        for k, v in sorted(self._content_metadata().items()):
            h.update(f"{k}={v}\n".encode())
        for name in sorted(self.deltas):
            t = _stored(self.deltas[name])
            if check is not None:
                check(name, t)
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return "mp1-" + h.hexdigest()[:32]

    def renamed(self, path: str | os.PathLike) -> "Patch":
        """This patch read again from where its file was renamed to: the same bytes, so what verify()
        established still holds (a server keeps validated copies this way; re-hashing them on every
        later change would read every active patch again)."""
        moved = load_patch(path)
        if moved.patch_id != self.patch_id:
            raise PatchError(f"{where(Path(path))} is not the file of patch {self.patch_id} ({moved.patch_id})")
        moved._verified = self._verified
        return moved

    def verified_elsewhere(self) -> "Patch":
        """This patch, its verify() taken as passed: for a process reading a file that another verified
        and that it found unchanged since (a server's workers, by the file's state), so the deltas are not
        read twice."""
        self._verified = True
        return self

    def verify(self) -> None:
        """The content checks every consumer relies on (PatchSet runs them): at least one delta, every
        delta finite, and, for a patch read from a file, the content hashing to the id its header records.
        Done once per Patch."""
        if self._verified:
            return
        label = where(self.path) if self.path else f"patch {self.name or self.patch_id}"
        if not self.deltas:
            raise PatchError(f"{label} holds no weight deltas; a patch changes at least one down-projection")

        def finite(name, t):
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"{label}: delta {name!r} holds NaN or Inf")

        if self.path is None:  # made in memory: nothing recorded to compare
            for name in sorted(self.deltas):
                finite(name, self.deltas[name])
        elif self.content_id(check=finite) != self.patch_id:  # one read of each delta for both checks
            raise CorruptPatchError(f"{label}: content does not match its patch id {self.patch_id} (modified?)")
        self._verified = True

    @property
    def layers(self) -> list[str]:
        return sorted(self.deltas)

    def metadata(self) -> dict[str, str]:
        return {**self._content_metadata(), "patch_id": self.patch_id, "created": self.created}

    # -- writing ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): a reader never sees half a patch."""
        tensors = {}
        for name in sorted(self.deltas):
            t = _stored(self.deltas[name])
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"delta {name!r} holds NaN or Inf; refusing to write {path}")
            tensors[name] = t
        header: dict = {"__metadata__": self.metadata()}
        offset = 0
        for name, t in tensors.items():
            n = t.numel() * 4
            header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        try:
            with atomic_file(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(struct.pack("<Q", len(raw)))
                    f.write(raw)
                    for t in tensors.values():
                        f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        except OSError as e:  # unwritable place, full disk: nothing is left behind (atomic_file)
            raise MemitError(f"cannot write the patch to {path}: {e.strerror or e}") from e
        return Path(path)


def _stored(t: torch.Tensor) -> torch.Tensor:
    """A delta as the file holds it: fp32, CPU, contiguous."""
    return t.detach().to("cpu", torch.float32).contiguous()


def where(path: Path) -> str:
    """How messages name a patch file: its name, so one refusal reads the same from every entry point
    (and a server's answers never show its own paths)."""
    return path.name


def _read_header(path: Path) -> tuple[dict, dict[str, tuple[str, list[int]]]]:
    """(metadata, tensor name -> (dtype, shape)) of a patch file (core.safetensors_header), F32 deltas only."""
    try:
        meta, tensors = read_header(path, MAX_HEADER_BYTES, "a patch")
    except HeaderError as e:
        raise CorruptPatchError(f"{where(path)}: {e}") from e
    except OSError as e:  # no permission to read it: a PatchError, which every entry point reports
        raise PatchError(f"cannot read patch file {where(path)}: {e.strerror or e}") from e
    for name, (dtype, _) in tensors.items():
        if dtype != "F32":
            raise CorruptPatchError(f"{where(path)}: delta {name!r} is {dtype}; patches hold F32 deltas")
    return meta, tensors


def load_patch(path: str | os.PathLike, verify_content: bool = False) -> Patch:
    """Open a patch: metadata now, tensors lazily. `verify_content` also re-hashes the id and checks values."""
    path = Path(path)
    try:
        mode = path.stat().st_mode  # not exists(): it called a loop of links missing
    except (FileNotFoundError, NotADirectoryError) as e:
        raise PatchError(f"patch file {path} does not exist") from e
    except OSError as e:  # a loop of links, a name too long: the OS's reason, a PatchError at every entry point
        raise PatchError(f"cannot open patch file {where(path)}: {e.strerror or e}") from e
    if not stat.S_ISREG(mode):
        raise PatchError(f"{where(path)} is not a regular file")
    meta, tensors = _read_header(path)
    if meta.get("format") != FORMAT_NAME:
        raise NotAPatchError(f"{where(path)} is a safetensors file but not a memit-vllm patch "
                             f"(no format={FORMAT_NAME!r})")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise MissingMetadataError(f"{where(path)}: metadata lacks {', '.join(missing)}")
    try:
        version = int(meta["format_version"])
    except ValueError as e:
        raise MissingMetadataError(f"{where(path)}: format_version is not an integer") from e
    if version > FORMAT_VERSION or version < 1:
        raise UnsupportedVersionError(
            f"{where(path)}: format version {version}; this memit-vllm reads versions 1..{FORMAT_VERSION} "
            "(upgrade memit-vllm)")
    parsed = {}
    for k, is_json in _FIELDS.items():
        if is_json and k in meta:
            try:
                parsed[k] = json.loads(meta[k])
            except (json.JSONDecodeError, RecursionError) as e:
                raise MissingMetadataError(f"{where(path)}: metadata field {k!r} is not valid JSON") from e
            if not isinstance(parsed[k], _JSON_TYPES[k]):
                raise MissingMetadataError(
                    f"{where(path)}: metadata field {k!r} is not a JSON {_JSON_TYPES[k].__name__}")
    try:
        base = BaseModel(**parsed["base"])
        if not all(isinstance(v, str) for v in base.to_dict().values()):
            raise TypeError("non-string value")
    except TypeError as e:
        raise MissingMetadataError(
            f"{where(path)}: metadata field 'base' must hold strings name_or_path, architecture, config_sha256") from e
    names = sorted(tensors)
    fingerprints = parsed["base_weights"]
    if set(names) != set(fingerprints) or not all(isinstance(v, str) for v in fingerprints.values()):
        raise MissingMetadataError(f"{where(path)}: base_weights must map exactly the patched tensors to fingerprints")
    made_on = parsed.get("made_on", [])
    if not all(isinstance(i, str) for i in made_on) or (made_on and version < LINEAGE_VERSION):
        raise MissingMetadataError(f"{where(path)}: made_on must list patch ids, in a file of format version "
                                   f">= {LINEAGE_VERSION}")
    patch = Patch(
        deltas=_LazyTensors(path, names), base=base, base_weights=parsed["base_weights"],
        requests=parsed["requests"], hparams=parsed.get("hparams", {}), covariance=parsed.get("covariance", {}),
        stats=parsed.get("stats", {}),
        name=meta.get("name", ""), version=meta.get("version", ""), parents=parsed.get("parents", []),
        created=meta.get("created", ""), tool_version=meta.get("tool_version", ""), path=path,
        made_on=made_on,
    )
    patch._patch_id = meta["patch_id"]
    if verify_content:
        patch.verify()
    return patch
