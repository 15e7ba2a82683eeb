"""The active patch stack of a running server, and the one sequence that changes it.

apply/revert: validate fully (off the event loop, so requests keep flowing; the content of a kept copy is
hashed once, and again only if its file changed: `_verified`), pause the engine until in-flight requests
finish, reload only the touched weights on every worker as base + active patches,
reset the prefix cache (its KV was computed with the old weights), resume. Every worker call runs under
a timeout. If the reload fails, the touched weights are reloaded from the previous stack; if that fails
too, the weights are unknown: the engine stays paused and the server reports itself unhealthy (`/health`
503, every route but GET /memit/patches and /metrics refused) until it is restarted. Once the weights
changed, the stack, the kept copies and the state file follow before the engine resumes, so a failed
resume (the server is then unhealthy too) leaves them describing the weights loaded.

The server keeps its own copy of every active patch (the workers read those), so moving or deleting
the operator's file after an apply cannot break a later revert. The copies live in a temp dir removed
when the server stops, or, with a state dir (`serve --memit-state DIR`), in DIR, with the stack recorded
after every change so that the next start serves it again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.contract import DRAIN_TIMEOUT_ENV, RPC_TIMEOUT_ENV, STATE_FILE, WITH_DEPENDANTS_PARAM
from memit_vllm.errors import MemitError
from memit_vllm.patch import BaseMismatchError, LineageError, Patch, load_patch
from memit_vllm.patch.merge import PatchSet

from . import metrics
from .admin import copy_from_dir, drain_timeout, rpc_timeout, write_state
from .compat import call_workers, drain, logger
from .patches import describe, file_state


class SwapError(MemitError):
    """The change was refused or rolled back; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class HotSwap:
    def __init__(self, engine, model: str, patches: list[Patch], patch_dir: Path | None = None,
                 max_patch_bytes: int = 0, state_dir: Path | None = None, dtype=None):
        self.engine = engine
        self.checkpoint = Checkpoint(model)
        self.patch_dir, self.max_patch_bytes, self.state_dir, self.dtype = patch_dir, max_patch_bytes, state_dir, dtype
        if state_dir is None:
            self.store = Path(tempfile.mkdtemp(prefix="memit-vllm-active-"))
            weakref.finalize(self, shutil.rmtree, self.store, True)  # at server stop (interpreter exit)
        else:
            self.store = state_dir / "patches"
            self.store.mkdir(parents=True, exist_ok=True)
        self.sources = {}  # patch id -> where the operator's file was (shown to admins only)
        self.verified = {}  # patch id -> patches.file_state of its kept copy when its content was verified
        self.active = [self._keep_startup(p) for p in patches]
        # The base fingerprint of every weight a patch has touched since start (GET /memit/weights lists
        # them): a reload of base bytes checks it.
        self.base = {n: fp for p in patches for n, fp in p.base_weights.items()}
        self.unhealthy: str | None = None
        self.lock = asyncio.Lock()
        self.drain_timeout = drain_timeout(os.environ)
        self.rpc_timeout = rpc_timeout(os.environ)
        self._save_state()

    # -- the store -------------------------------------------------------------------------------
    def _keep_startup(self, patch: Patch) -> Patch:
        """A patch the server started with (already merged by the loader): kept as is when it is a
        restored copy in the store, else copied into it."""
        self.sources[patch.patch_id] = str(patch.path)
        if patch.path.resolve().is_relative_to(self.store.resolve()):
            return patch
        incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.store))
        shutil.copyfile(patch.path, incoming / patch.path.name)
        return self._commit(incoming, load_patch(incoming / patch.path.name))

    def _commit(self, incoming: Path, patch: Patch) -> Patch:
        kept = self.store / patch.patch_id
        shutil.rmtree(kept, ignore_errors=True)
        incoming.rename(kept)
        return patch.renamed(kept / patch.path.name)

    def _forget(self, patch: Patch) -> None:
        shutil.rmtree(patch.path.parent, ignore_errors=True)
        self.sources.pop(patch.patch_id, None)
        self.verified.pop(patch.patch_id, None)

    def _active_ids(self) -> set[str]:
        return {p.patch_id for p in self.active}

    def _save_state(self) -> None:
        if self.state_dir is not None:
            write_state(self.state_dir, self.active)

    def describe(self, paths: bool = False) -> list[dict]:
        """The active stack; with `paths` (admins) also each patch's operator file and kept copy."""
        return [{**describe(p), **({"source": self.sources.get(p.patch_id), "file": str(p.path)} if paths else {})}
                for p in self.active]

    # -- changes ---------------------------------------------------------------------------------
    def _healthy(self) -> None:
        if self.unhealthy:
            raise SwapError(f"the server is unhealthy ({self.unhealthy}); restart it", 503)

    async def apply(self, name: str) -> dict:
        self._healthy()
        async with self.lock:
            self._healthy()
            start = time.perf_counter()
            try:
                patch = await asyncio.to_thread(self._validated, name)
            except SwapError:
                metrics.SWAPS.labels("apply", "refused").inc()
                raise
            self.sources[patch.patch_id] = name
            try:
                unrecorded = await self._swap(self.active + [patch], sorted(patch.deltas), "apply")
            except BaseException:
                if patch.patch_id not in self._active_ids():  # else the weights changed: it is recorded
                    self._forget(patch)
                raise
            return self._done("apply", start, unrecorded, f"patch {patch.patch_id} is applied and served",
                              applied=describe(patch))

    async def revert(self, patch_id: str, with_dependants: bool = False) -> dict:
        self._healthy()
        async with self.lock:
            self._healthy()
            start = time.perf_counter()
            try:
                removed = self._removal(patch_id, with_dependants)
                gone = {p.patch_id for p in removed}
                stack = [p for p in self.active if p.patch_id not in gone]
                names = sorted({n for p in removed for n in p.deltas})
                await asyncio.to_thread(self._check_base, names)
                stack = await asyncio.to_thread(self._verified, stack)
            except SwapError:
                metrics.SWAPS.labels("revert", "refused").inc()
                raise
            reverted = [describe(p) for p in removed]
            unrecorded = await self._swap(stack, names, "revert")
            return self._done("revert", start, unrecorded, f"{', '.join(p.patch_id for p in removed)} reverted",
                              reverted=reverted)

    def _done(self, action: str, start: float, unrecorded: str | None, done: str, **what) -> dict:
        """The answer to a change made; a SwapError when the state file could not record it."""
        seconds = time.perf_counter() - start
        metrics.SWAPS.labels(action, {"apply": "applied", "revert": "reverted"}[action]).inc()
        metrics.SECONDS.labels(action).observe(seconds)
        logger.info("memit: %s done in %.3f s; active: %s", action, seconds, [p.patch_id for p in self.active])
        if unrecorded:
            raise SwapError(f"{done}, but {unrecorded}; the next apply or revert records the whole stack", 500)
        return {**what, "active": self.describe(), "seconds": round(seconds, 3)}

    def _removal(self, patch_id: str, with_dependants: bool) -> list[Patch]:
        """The patch to revert, and the active patches made on it (their `made_on` lists it): without
        it they are other edits than the ones made, so they go too, or the revert is refused."""
        gone = next((p for p in self.active if p.patch_id == patch_id), None)
        if gone is None:
            raise SwapError(f"patch {patch_id} is not active; active: "
                            f"{[p.patch_id for p in self.active] or 'none'}", 404)
        dependants = [p for p in self.active if patch_id in p.made_on]
        if dependants and not with_dependants:
            raise SwapError(f"patches {[p.patch_id for p in dependants]} were made on {patch_id}; revert them "
                            f"first, or add ?{WITH_DEPENDANTS_PARAM}=true to revert them with it", 409)
        return [gone, *dependants]

    def _check_base(self, names: list[str]) -> None:
        """The checkpoint bytes a revert reloads must still be the base the server started on."""
        for n in names:
            if self.checkpoint.fingerprint(n) != self.base[n]:
                raise SwapError(f"the checkpoint's weight {n!r} changed on disk since this server loaded it; "
                                "nothing reverted: restart the server on the checkpoint it should serve", 409)

    def _validated(self, name: str) -> Patch:
        """Copy the patch file into the store (bounded), then validate the copy (the bytes the workers
        will read) on top of the active stack, with the one validation every entry point runs."""
        if self.patch_dir is None:
            raise SwapError("hot apply is off: start the server with MEMIT_VLLM_PATCH_DIR naming the "
                            "directory to take patch files from", 403)
        stack = self._verified(self.active)
        incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.store))
        try:
            dest = incoming / Path(name).name
            copy_from_dir(self.patch_dir, name, dest, self.max_patch_bytes)
            patch = load_patch(dest)
            state = file_state(dest)  # before the hash: a change from now on shows in it (the rename keeps it)
            PatchSet(stack + [patch], dtype=self.dtype).validate(self.checkpoint)
            kept = self._commit(incoming, patch)
        except (BaseMismatchError, LineageError) as e:
            raise SwapError(str(e), 409) from e
        except MemitError as e:
            raise SwapError(str(e), 422) from e
        except OSError as e:
            raise SwapError(f"cannot keep a copy of {name!r}: {e.strerror or e}", 507) from e
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        self.verified[kept.patch_id] = state
        return kept

    def _verified(self, stack: list[Patch]) -> list[Patch]:
        """`stack` with each kept copy verified in the state it is in now: a patch verified in that state
        (patches.file_state) is not read again, any other is hashed now, before the drain (the workers
        then only check the state). Copies verified here replace the active ones too."""
        fresh = {}
        for p in stack:
            try:
                state = file_state(p.path)
                if self.verified.get(p.patch_id) == state:
                    continue
                again = load_patch(p.path, verify_content=True)
                if again.patch_id != p.patch_id:
                    raise MemitError(f"it now holds patch {again.patch_id}")
            except (MemitError, OSError) as e:
                raise SwapError(f"the server's copy of active patch {p.patch_id} changed on disk since it was "
                                f"applied ({_why(e)}); nothing changed: revert it and apply it again", 409) from e
            fresh[p.patch_id], self.verified[p.patch_id] = again, state
        self.active = [fresh.get(p.patch_id, p) for p in self.active]
        return [fresh.get(p.patch_id, p) for p in stack]

    async def _swap(self, stack: list[Patch], names: list[str], action: str) -> str | None:
        """Change the weights to base + `stack`, or leave them (SwapError); why the state file does not
        record the change, if it does not."""
        previous = self.active
        base = {**self.base, **{n: fp for p in stack for n, fp in p.base_weights.items()}}
        try:
            await asyncio.wait_for(drain(self.engine), self.drain_timeout)
        except asyncio.TimeoutError:
            await self._resume()
            metrics.SWAPS.labels(action, "refused").inc()
            raise SwapError(f"in-flight requests did not finish within {self.drain_timeout:g} s "
                            f"({DRAIN_TIMEOUT_ENV}); nothing changed", 503) from None
        try:
            await self._reload(stack, names, base)
        except Exception as e:  # vLLM reports a worker's failure as a bare Exception; a timeout is one too
            metrics.SWAPS.labels(action, "failed").inc()
            logger.error("memit: reloading %s failed (%s); restoring the previous patch set", names, _why(e))
            try:
                await self._reload(previous, names, base)
            except Exception as e2:
                self._fail(f"reloading failed ({_why(e)}) and restoring the previous weights failed too ({_why(e2)})")
                raise SwapError(f"reloading the weights failed ({_why(e)}), and so did restoring the previous "
                                f"ones ({_why(e2)}): the weights are unknown, the server refuses all traffic "
                                "(health 503); restart it", 500) from e2
            await self._resume()
            raise SwapError(f"reloading the weights failed ({_why(e)}); the previous patch set is restored",
                            500) from e
        self.active = stack
        self.base.update({n: base[n] for n in names})
        unrecorded = self._record()
        await self._resume(f"the change is made (GET /memit/patches shows the stack now loaded"
                           f"{f'; {unrecorded}' if unrecorded else ''}), but ")
        return unrecorded

    def _record(self) -> str | None:
        """The weights are now `self.active`: the metrics, the state file and the kept copies say so
        before the engine resumes, so that a failed resume leaves them true (and a restart serves it).
        If the state file cannot be written, why: it then still records an earlier stack, whose kept
        copies stay until a later change is recorded."""
        metrics.show_active(self.describe(), {})  # no variants: LoRA servers cannot hot-swap
        try:
            self._save_state()
        except (OSError, MemitError) as e:
            logger.error("memit: writing the state file failed (%s); it records an earlier stack", e)
            return (f"{STATE_FILE} in the --memit-state dir could not be written ({_why(e)}): it still "
                    "records the last stack written, which a restart would serve")
        keep = self._active_ids()
        for kept in self.store.iterdir():
            if kept.name not in keep and not kept.name.startswith("."):  # not an incoming copy
                shutil.rmtree(kept, ignore_errors=True)
        self.sources = {pid: source for pid, source in self.sources.items() if pid in keep}
        self.verified = {pid: state for pid, state in self.verified.items() if pid in keep}
        return None

    async def _resume(self, done: str = "") -> None:
        try:
            await asyncio.wait_for(self.engine.reset_prefix_cache(), self.rpc_timeout)
            await asyncio.wait_for(self.engine.resume_generation(), self.rpc_timeout)
        except Exception as e:
            self._fail(f"resuming the engine failed ({_why(e)})")
            raise SwapError(f"{done}resuming the engine failed ({_why(e)}); restart the server", 500) from e

    def _fail(self, reason: str) -> None:
        self.unhealthy = reason
        logger.critical("memit: %s; the server refuses all traffic (health 503) until it is restarted", reason)

    async def _reload(self, stack: list[Patch], names: list[str], base: dict[str, str]) -> None:
        start = time.perf_counter()
        await asyncio.wait_for(call_workers(self.engine, "memit_reload", [str(p.path) for p in stack],
                                            [p.patch_id for p in stack],
                                            [self.verified.get(p.patch_id) for p in stack], names,
                                            {n: base[n] for n in names}),
                               self.rpc_timeout)
        logger.info("memit: reloaded %d weights as base + %d patch(es) in %.3f s", len(names), len(stack),
                    time.perf_counter() - start)

    async def weight_hashes(self) -> dict:
        names = sorted(self.base)
        served = (await asyncio.wait_for(call_workers(self.engine, "memit_weight_hashes", names),
                                         self.rpc_timeout))[0] if names else {}
        base = await asyncio.to_thread(lambda: {n: self.checkpoint.fingerprint(n) for n in names})
        return {"weights": {n: {"sha256": served[n], "base_sha256": base[n], "is_base": served[n] == base[n]}
                            for n in names}}


def _why(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer within the timeout ({RPC_TIMEOUT_ENV})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror  # without the file name: server paths stay out of answers
    return str(e) or type(e).__name__
