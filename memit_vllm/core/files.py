"""Atomic writes: a reader (or a crash) never sees half a file or half a directory.

Write into a temp sibling, fsync it, rename over the final name, fsync the parent directory. The
result gets the mode a plain open() would give under the current umask (mkstemp/mkdtemp make 0600/0700).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from ..errors import MemitError


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once, at import: os.umask can only be read by setting it, which would race with threads that
# create files meanwhile (the server writes its state file from a worker thread).
_UMASK = _read_umask()


def _umask_mode(mode: int) -> int:
    return mode & ~_UMASK


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _check_file_target(out: Path, name: str) -> None:
    """A file is written by renaming over `out`: over a directory that fails, and over a device or a FIFO
    it would replace the device itself (as root, /dev/null would become a regular file). A link is renamed
    over, not written through: whatever it points to is left alone (a cache entry linked to /dev/zero is
    replaced by a plain file)."""
    if out.is_dir():
        raise MemitError(f"{name} is a directory; give the path of a file to write")
    if not out.is_symlink() and out.exists() and not out.is_file():
        raise MemitError(f"{name} is not a regular file (a device, a FIFO...); give the path of a file to write")


def check_out_file(out: str | os.PathLike, flag: str, inputs=()) -> Path:
    """Fail before the work, not after it: `out` (given as `flag`) must name a regular file, or nothing
    yet, whose directory exists or can be made, and none of the command's `inputs` (files; None: not given),
    which the output would replace."""
    out = Path(out)
    _check_file_target(out, f"{flag} {out}")
    for given in inputs:
        if given is not None and out.exists() and Path(given).is_file() and out.samefile(given):
            raise MemitError(f"{flag} {out} is the input {given}; writing there would replace it: pick another path")
    check_can_create(out.parent, f"{flag} {out}")
    return out


def check_can_create(folder: str | os.PathLike, what: str) -> None:
    """`folder` is a writable directory, or can be made: its nearest existing ancestor (where the missing
    directories get created) is one. `what` names the input in the error (`--flag path`)."""
    parent = Path(folder)
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MemitError(f"{what}: cannot write there ({parent} is not a writable directory)")


def check_report_outputs(outputs: dict[str, str | None], inputs=()) -> None:
    """check_out_file for each report output given (flag -> path; None: not given, "-": standard output)."""
    for flag, out in outputs.items():
        if out is not None and out != "-":
            check_out_file(out, flag, inputs)


@contextmanager
def _named(final: Path):
    """A write's OSError (a full disk: ENOSPC from write or fsync) names no file, so the CLI could not say which
    output failed and showed a traceback; it gets `final`'s name. safetensors' save_file reports one as a
    SafetensorError ("I/O error: ... (os error 28)"), which becomes that OSError."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(final)
        raise
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(final)) from e


@contextmanager
def atomic_file(final: str | os.PathLike, suffix: str = ""):
    """Yield a temp path beside `final`; on success it is fsynced and renamed over `final`."""
    final = Path(final)
    _check_file_target(final, str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    try:
        with _named(final):
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _umask_mode(0o666))
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_new_dir(out: str | os.PathLike, what: str) -> Path:
    """`out` must not exist (or be an empty dir): writers of whole directories never overwrite."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MemitError(f"{out} already exists; {what} writes a new directory (remove it or pick another)")
    return out


@contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool = False):
    """Yield a temp dir beside `final`; on success its files are fsynced and it is renamed to `final`
    (which must not exist, or be empty, unless `replace`)."""
    final = Path(final)
    if not replace:
        check_new_dir(final, "this command")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        with _named(final):
            yield tmp
            _fsync_tree(tmp)
            tmp.chmod(_umask_mode(0o777))
            if replace and final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
