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
from ..core.records import EditRequest
from ..patch import Patch
from . import distributed
from .covariance import read_checked
from .lineage import merge_stack, patch_requests


class LineageKeys:
    """The kept lineage facts' keys, each from the cache entry of the last patch of the stack that edited
    it. `reading` names what keys depend on besides the patches (templates, layers, dtypes); entries are
    keyed by it, the base weights' hash and the ids of the stack up to their patch."""

    def __init__(self, cache: Path, model_sha: str, reading: dict, layers: list[int], d_ff: int):
        self.dir = cache / "lineage-keys" / model_sha[:24]
        self.model_sha, self.layers, self.d_ff = model_sha, list(layers), d_ff
        self.reading = hashlib.sha256(json.dumps(reading, sort_keys=True).encode()).hexdigest()[:24]
        self.kept: dict[int, torch.Tensor] = {}  # layer -> [kept facts, d_ff] fp32 (prepare)

    def _identity(self, lineage: list[str]) -> dict[str, str]:
        return {"model": self.model_sha, "reading": self.reading, "lineage": json.dumps(lineage)}

    def _file(self, lineage: list[str]) -> Path:
        key = hashlib.sha256(json.dumps(self._identity(lineage), sort_keys=True).encode()).hexdigest()[:32]
        return self.dir / f"{key}.safetensors"

    def _load(self, lineage: list[str], n: int) -> dict[int, torch.Tensor] | None:
        """The cached keys of the last patch of `lineage` (n requests), or None: absent or unsound (warned)."""
        f = self._file(lineage)
        if not f.is_file():
            return None
        got, problem = read_checked(f, self._identity(lineage), tuple(f"layer{l}" for l in self.layers),
                                    (n, self.d_ff))
        if problem:
            warnings.warn(f"lineage key cache entry {f}: {problem}; reading those keys again", stacklevel=3)
            return None
        return {l: got[f"layer{l}"] for l in self.layers}

    def save(self, lineage: list[str], keys: dict[int, torch.Tensor]) -> None:
        """Cache the keys (per layer, [requests, d_ff]) of the last patch of `lineage`. Under torch.distributed
        every rank writes (the same bytes, atomically): each reads its own cache back."""
        with atomic_file(self._file(lineage)) as tmp:
            save_file({f"layer{l}": keys[l].float().contiguous().cpu() for l in self.layers}, str(tmp),
                      metadata=self._identity(lineage))

    def prepare(self, em, ckpt: Checkpoint, stack: list[Patch], kept: set,
                read_keys: Callable[[list[EditRequest]], dict[int, torch.Tensor]]) -> int:
        """Gather the keys of the kept facts (`kept`: their EditRequest.fact) from the cache, reading (and
        caching) those of a patch with no sound entry by `read_keys` on base + the stack up to it: the model
        is then left with a prefix of the stack merged (the caller merges the whole stack next). Returns
        how many patches' keys were read."""
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
        cached = [self._load(ids[:k + 1], len(requests[k])) for k in todo]
        # a patch any rank lacks is read by all (the reads are collective under torch.distributed)
        missing = distributed.any_rank([keys is None for keys in cached])
        parts: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        for k, keys, read in zip(todo, cached, missing):
            if read:
                merge_stack(em, ckpt, stack[:k + 1])
                keys = read_keys(requests[k])
                self.save(ids[:k + 1], keys)
            for l in self.layers:
                parts[l].append(keys[l][sorted(wanted[k])].float().cpu())
        self.kept = {l: torch.cat(p) for l, p in parts.items() if p}
        return sum(missing)

    @property
    def count(self) -> int:
        return len(next(iter(self.kept.values()))) if self.kept else 0

    def at(self, layer: int) -> torch.Tensor:
        """The kept facts' keys at `layer`, [count, d_ff] fp32."""
        return self.kept[layer]
