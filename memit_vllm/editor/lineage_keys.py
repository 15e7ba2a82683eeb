"""The keys of a lineage's facts (`make-patch --on`), read once per patch and cached.

Each fact's key is read on the model as its own patch left it: base + the stack up to and including that
patch (AlphaEdit's reference likewise accumulates each batch's keys as it edits). Those are exactly the
keys the patch's own update loop read (each layer's keys are read after every layer below it is updated),
so make-patch `--on` caches its patch's keys as it finishes, and the next patch on the lineage reads none
of the earlier facts again (on SmolLM2, --on a 1,000-edit lineage costs 1.05x the same edits on the
base; re-reading them 2.81x). Later patches edit the layers below an earlier fact's keys, so they move:
`lineage_keys: current` re-reads every fact on the model being edited instead; its patches differ (23%
of the deltas' norm after 1,000 edits) and score the same (docs/benchmarks.md, "Session 16").

The keys are a function of the stack's patch files, the base and the reading settings only: the cache
memoises it (an entry missing or unsound is read again, on base + the stack up to its patch), so a
patch made with or without a warm cache is the same.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import Checkpoint
from ..core.files import atomic_file
from ..core.records import EditRequest, parse_record
from ..errors import MemitError
from ..patch import Patch
from . import distributed
from .covariance import read_checked
from .lineage import merge_stack


def patch_requests(p: Patch) -> list[EditRequest]:
    return [parse_record(rec, f"patch {p.name or p.patch_id} request {i}") for i, rec in enumerate(p.requests)]


class LineageKeys:
    """Where each kept lineage fact's keys are: the cache entry of the last patch of the stack that edited
    it, and its row there. `reading` names what keys depend on besides the patches (templates, layers,
    dtypes); entries are keyed by it, the base weights' hash and the ids of the stack up to their patch."""

    def __init__(self, cache: Path, model_sha: str, reading: dict, layers: list[int], d_ff: int):
        self.dir = cache / "lineage-keys" / model_sha[:24]
        self.model_sha, self.layers, self.d_ff = model_sha, list(layers), d_ff
        self.reading = hashlib.sha256(json.dumps(reading, sort_keys=True).encode()).hexdigest()[:24]
        self.entries: list[tuple[Path, dict, int, list[int]]] = []  # file, identity, its facts, kept rows

    def _identity(self, lineage: list[str]) -> dict[str, str]:
        return {"model": self.model_sha, "reading": self.reading, "lineage": json.dumps(lineage)}

    def _file(self, lineage: list[str]) -> Path:
        key = hashlib.sha256(json.dumps(self._identity(lineage), sort_keys=True).encode()).hexdigest()[:32]
        return self.dir / f"{key}.safetensors"

    def _sound(self, lineage: list[str], n: int) -> bool:
        f = self._file(lineage)
        if not f.is_file():
            return False
        got, problem = read_checked(f, self._identity(lineage), tuple(f"layer{l}" for l in self.layers),
                                    (n, self.d_ff))
        if problem:
            warnings.warn(f"lineage key cache entry {f}: {problem}; reading those keys again", stacklevel=3)
        return got is not None

    def save(self, lineage: list[str], keys: dict[int, torch.Tensor]) -> None:
        """Cache the keys (per layer, [requests, d_ff]) of the last patch of `lineage`. Under torch.distributed
        every rank writes (the same bytes, atomically): each reads its own cache back."""
        with atomic_file(self._file(lineage)) as tmp:
            save_file({f"layer{l}": keys[l].float().contiguous().cpu() for l in self.layers}, str(tmp),
                      metadata=self._identity(lineage))

    def prepare(self, em, ckpt: Checkpoint, stack: list[Patch], kept: set,
                read_keys: Callable[[list[EditRequest]], dict[int, torch.Tensor]]) -> int:
        """Find (or read and cache) the keys of every patch of `stack` holding a kept fact (`kept`: their
        EditRequest.fact) and note each kept fact's row. A missing entry is read by `read_keys` on base +
        the stack up to its patch: the model is left with a prefix of the stack merged (the caller merges
        the whole stack next). Returns how many patches' keys were read."""
        latest: dict[tuple, tuple[int, int]] = {}  # fact -> (patch index, row) of its last request
        requests = [patch_requests(p) for p in stack]
        for k, rs in enumerate(requests):
            for i, r in enumerate(rs):
                latest[r.fact] = (k, i)
        wanted: dict[int, list[int]] = {}
        for fact, (k, i) in latest.items():
            if fact in kept:
                wanted.setdefault(k, []).append(i)
        ids, todo = [p.patch_id for p in stack], sorted(wanted)
        # a patch any rank lacks is read by all (the reads are collective under torch.distributed)
        missing = distributed.any_rank([not self._sound(ids[:k + 1], len(requests[k])) for k in todo])
        for k, read in zip(todo, missing):
            lineage = ids[:k + 1]
            if read:
                merge_stack(em, ckpt, stack[:k + 1])
                self.save(lineage, read_keys(requests[k]))
            self.entries.append((self._file(lineage), self._identity(lineage), len(requests[k]), sorted(wanted[k])))
        return sum(missing)

    @property
    def count(self) -> int:
        return sum(len(rows) for *_, rows in self.entries)

    def at(self, layer: int) -> torch.Tensor:
        """The kept facts' keys at `layer`, [count, d_ff] fp32."""
        parts = []
        for f, identity, n, rows in self.entries:
            got, problem = (read_checked(f, identity, (f"layer{layer}",), (n, self.d_ff)) if f.is_file()
                            else (None, "it is gone"))
            if got is None:
                raise MemitError(f"lineage key cache entry {f} changed while make-patch ran ({problem}); run it again")
            parts.append(got[f"layer{layer}"][rows])
        return torch.cat(parts) if parts else torch.zeros(0, self.d_ff)
