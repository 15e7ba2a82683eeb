"""Where memit-vllm keeps prepared models and covariance statistics."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_ENV = "MEMIT_VLLM_CACHE"


def cache_dir() -> Path:
    """$MEMIT_VLLM_CACHE, else $XDG_CACHE_HOME/memit-vllm, else ~/.cache/memit-vllm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "memit-vllm"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
