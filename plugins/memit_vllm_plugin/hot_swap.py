"""The active patch stack of a running server, and the one sequence that changes it.

apply/revert: validate fully (off the event loop, so requests keep flowing), pause the engine until
in-flight requests finish, reload only the touched weights on every worker as base + active patches,
reset the prefix cache (its KV was computed with the old weights), resume. If the reload fails, the
touched weights are reloaded from the previous stack, so the server keeps serving what it served.

The server keeps its own copy of every active patch (the workers read those), so moving or deleting
the operator's file after an apply cannot break a later revert.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.contract import DRAIN_TIMEOUT_ENV
from memit_vllm.errors import MemitError
from memit_vllm.patch import BaseMismatchError, Patch, PatchError, load_patch
from memit_vllm.patch.merge import PatchSet

from .compat import call_workers, drain, logger
from .patches import describe


class SwapError(MemitError):
    """The change was refused or rolled back; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class HotSwap:
    def __init__(self, engine, model: str, patches: list[Patch]):
        self.engine = engine
        self.checkpoint = Checkpoint(model)
        self.store = Path(tempfile.mkdtemp(prefix="memit-vllm-active-"))
        self.info = {}  # patch id -> describe() of the operator's file
        self.active = [self._keep(p.path) for p in patches]
        # Every weight a patch has touched since start: after a revert these should hash to the base.
        self.touched = {n for p in patches for n in p.deltas}
        self.lock = asyncio.Lock()
        self.drain_timeout = float(os.environ.get(DRAIN_TIMEOUT_ENV, "120"))

    def _keep(self, source: str | Path, check=None) -> Patch:
        """Copy a patch file into the server's store, verify the copy (the bytes the workers will read),
        run `check` on it, and keep it under its id. Nothing is kept if any of that fails."""
        incoming = self.store / f"incoming-{os.getpid()}-{time.monotonic_ns()}.patch"
        try:
            shutil.copyfile(source, incoming)
            patch = load_patch(incoming, verify_content=True)
            if check:
                check(patch)
            pid = patch.patch_id  # verified equal to the recorded id above
            kept = incoming.rename(self.store / f"{pid}.patch")
        except OSError as e:
            raise PatchError(f"cannot read patch file {source}: {e.strerror or e}") from e
        finally:
            incoming.unlink(missing_ok=True)
        kept = load_patch(kept)
        self.info[pid] = {**describe(kept), "path": str(source)}
        return kept

    def _forget(self, patch: Patch) -> dict:
        patch.path.unlink(missing_ok=True)
        return self.info.pop(self._id(patch))

    def _id(self, patch: Patch) -> str:
        return patch.path.stem

    def describe(self) -> list[dict]:
        return [self.info[self._id(p)] for p in self.active]

    async def apply(self, path: str) -> dict:
        async with self.lock:
            start = time.perf_counter()
            patch = await asyncio.to_thread(self._validated, path)
            try:
                await self._swap(self.active + [patch], sorted(patch.deltas))
            except BaseException:
                self._forget(patch)
                raise
            return {"applied": self.info[self._id(patch)], "active": self.describe(),
                    "seconds": round(time.perf_counter() - start, 3)}

    async def revert(self, patch_id: str) -> dict:
        async with self.lock:
            start = time.perf_counter()
            gone = next((p for p in self.active if self._id(p) == patch_id), None)
            if gone is None:
                raise SwapError(f"patch {patch_id} is not active; active: "
                                f"{[self._id(p) for p in self.active] or 'none'}", 404)
            await self._swap([p for p in self.active if p is not gone], sorted(gone.deltas))
            return {"reverted": self._forget(gone), "active": self.describe(),
                    "seconds": round(time.perf_counter() - start, 3)}

    async def weight_hashes(self) -> dict:
        names = sorted(self.touched)
        served = (await call_workers(self.engine, "memit_weight_hashes", names))[0] if names else {}
        base = await asyncio.to_thread(lambda: {n: self.checkpoint.fingerprint(n) for n in names})
        return {"weights": {n: {"sha256": served[n], "base_sha256": base[n], "is_base": served[n] == base[n]}
                            for n in names}}

    def _validated(self, path: str) -> Patch:
        def check(patch: Patch) -> None:
            if any(self._id(p) == patch.patch_id for p in self.active):
                raise SwapError(f"patch {patch.patch_id} ({path}) is already active", 409)
            PatchSet(self.active + [patch]).validate(self.checkpoint)

        try:
            return self._keep(path, check)
        except BaseMismatchError as e:
            raise SwapError(str(e), 409) from e
        except PatchError as e:
            raise SwapError(str(e), 422) from e

    async def _swap(self, stack: list[Patch], names: list[str]) -> None:
        previous = self.active
        try:
            await asyncio.wait_for(drain(self.engine), self.drain_timeout)
        except asyncio.TimeoutError:
            await self.engine.resume_generation()
            raise SwapError(f"in-flight requests did not finish within {self.drain_timeout:g} s "
                            f"({DRAIN_TIMEOUT_ENV}); nothing changed", 503) from None
        try:
            try:
                await self._reload(stack, names)
            except Exception as e:
                logger.error("memit: reloading %s failed (%s); restoring the previous patch set", names, e)
                await self._reload(previous, names)
                raise SwapError(f"reloading the weights failed ({e}); the previous patch set is restored", 500) from e
            self.active = stack
            self.touched.update(names)
        finally:
            await self.engine.reset_prefix_cache()
            await self.engine.resume_generation()

    async def _reload(self, stack: list[Patch], names: list[str]) -> None:
        start = time.perf_counter()
        await call_workers(self.engine, "memit_reload", [str(p.path) for p in stack], [self._id(p) for p in stack],
                           names)
        logger.info("memit: reloaded %d weights as base + %d patch(es) in %.3f s", len(names), len(stack),
                    time.perf_counter() - start)
