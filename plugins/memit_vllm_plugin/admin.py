"""What the admin routes trust, checked without vLLM or FastAPI (so `memit-vllm serve` checks it too,
before an engine starts): the token, the patch directory and the files taken from it, and the state
directory that carries the active stack across restarts.

The security model (README "Hot apply and revert"): a token of at least MIN_ADMIN_TOKEN_LENGTH
characters, no whitespace; patch files only by name inside MEMIT_VLLM_PATCH_DIR, symlinks resolved and
refused when they leave it, only regular files, size-bounded before a byte is read; nothing of a refused
file's content in any answer (patch errors name the file, never quote it).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from memit_vllm.core.contract import (ADMIN_TOKEN_ENV, DRAIN_TIMEOUT_ENV, MAX_PATCH_BYTES_ENV, MIN_ADMIN_TOKEN_LENGTH,
                                      PATCH_DIR_ENV, RPC_TIMEOUT_ENV, STATE_FILE)
from memit_vllm.core.files import atomic_file
from memit_vllm.errors import MemitError
from memit_vllm.patch import Patch, PatchError, load_patch

DEFAULT_MAX_PATCH_BYTES = 4 << 30
_COPY_CHUNK = 16 << 20


def admin_token(env: Mapping[str, str]) -> str | None:
    """The admin token, or None when the admin routes are off. A token that could never match (the HTTP
    layer strips whitespace) or that is short enough to guess stops the server at startup."""
    token = env.get(ADMIN_TOKEN_ENV)
    if not token:
        return None
    if any(c.isspace() for c in token):
        raise MemitError(f"{ADMIN_TOKEN_ENV} contains whitespace, which HTTP headers cannot carry intact; "
                         "use e.g. $(openssl rand -hex 16)")
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise MemitError(f"{ADMIN_TOKEN_ENV} has {len(token)} characters, fewer than {MIN_ADMIN_TOKEN_LENGTH}; "
                         "use e.g. $(openssl rand -hex 16)")
    return token


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` header (scheme in any case), or ""."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def patch_dir(env: Mapping[str, str]) -> Path | None:
    """The directory hot apply takes patches from (resolved), or None: then no apply."""
    value = env.get(PATCH_DIR_ENV)
    if not value:
        return None
    path = Path(value).resolve()
    if not path.is_dir():
        raise MemitError(f"{PATCH_DIR_ENV}={value} is not a directory")
    return path


def _seconds(env: Mapping[str, str], name: str, default: str) -> float:
    value = env.get(name, default)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise MemitError(f"{name}={value!r}: expected a positive number of seconds")
    return seconds


def drain_timeout(env: Mapping[str, str]) -> float:
    """Seconds a hot swap waits for in-flight requests (default 120)."""
    return _seconds(env, DRAIN_TIMEOUT_ENV, "120")


def rpc_timeout(env: Mapping[str, str]) -> float:
    """Seconds a worker call may take before the swap counts as failed (default 300)."""
    return _seconds(env, RPC_TIMEOUT_ENV, "300")


def max_patch_bytes(env: Mapping[str, str]) -> int:
    value = env.get(MAX_PATCH_BYTES_ENV, str(DEFAULT_MAX_PATCH_BYTES))
    if not value.isdigit() or int(value) < 1:
        raise MemitError(f"{MAX_PATCH_BYTES_ENV}={value!r}: expected a positive number of bytes")
    return int(value)


def copy_from_dir(directory: Path, name: str, dest: Path, limit: int) -> None:
    """Copy the regular file `name` inside `directory` to `dest`, reading at most `limit` bytes. Refused
    (PatchError, with nothing read): an absolute name, a name that resolves outside the directory (`..`,
    symlinks), anything but a regular file, a file larger than `limit`."""
    refused = f"{name!r} is not a patch file in the patch directory ({PATCH_DIR_ENV})"
    if not name or "\0" in name or Path(name).is_absolute():
        raise PatchError(f"{refused}: give its file name inside that directory")
    source = (directory / name).resolve()
    if not source.is_relative_to(directory):
        raise PatchError(f"{refused}: it resolves outside that directory")
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise PatchError(f"{refused}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PatchError(f"{refused}: not a regular file")
        if info.st_size > limit:
            raise PatchError(f"{name!r} has {info.st_size} bytes, more than the {limit} this server reads "
                             f"({MAX_PATCH_BYTES_ENV})")
        left = info.st_size
        with open(dest, "wb") as out:
            while left > 0:
                block = src.read(min(left, _COPY_CHUNK))
                if not block:
                    break
                out.write(block)
                left -= len(block)


# -- the state directory (`memit-vllm serve --memit-state DIR`) ---------------------------------------
def write_state(state_dir: Path, stack: list[Patch]) -> None:
    """Record the active stack (ids and the kept files, relative to the state dir), atomically."""
    record = {"patches": [{"id": p.patch_id, "file": str(p.path.relative_to(state_dir))} for p in stack]}
    with atomic_file(state_dir / STATE_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def read_state(state_dir: Path) -> list[Patch]:
    """The recorded stack, each patch checked to be there and to hold the recorded patch (its content
    hashed: the patches come back verified); [] when nothing is recorded. A recorded patch gone or
    changed is an error: the server must not start serving something else than it served."""
    record = state_dir / STATE_FILE
    if not record.is_file():
        return []
    try:
        entries = json.loads(record.read_text())["patches"]
        recorded = [(str(e["id"]), state_dir / str(e["file"])) for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise MemitError(f"{record} is damaged ({e}); remove it to start without the recorded stack") from e
    stack = []
    for pid, path in recorded:
        if not path.resolve().is_relative_to(state_dir.resolve()):
            raise MemitError(f"{record} names {path}, outside {state_dir}; remove the record")
        try:
            patch = load_patch(path, verify_content=True)
        except PatchError as e:
            raise MemitError(f"the recorded active patch {pid} is gone or changed ({e}); restore "
                             f"{path} or remove {record} to start without the recorded stack") from e
        if patch.patch_id != pid:
            raise MemitError(f"{path} holds patch {patch.patch_id}, but {record} records {pid}; restore it "
                             f"or remove {record}")
        stack.append(patch)
    return stack
