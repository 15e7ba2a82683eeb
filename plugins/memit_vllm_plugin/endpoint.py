"""The `/memit/...` routes: what a server serves, and (with an admin token) hot apply and revert.

A `vllm.endpoint_plugins` entry point; vLLM loads it in the API server process only when
`VLLM_PLUGINS` names it (`memit-vllm serve` sets that).

- `GET /memit/patches`: the active patch stack and the patch behind each `--memit-variant` model, public
  like `/v1/models` (clients and deploy checks).
- `POST /memit/patches {"path": FILE}`: apply a patch on top of the stack, without a restart.
- `DELETE /memit/patches/{id}`: revert one patch; its weights go back to base + the others.
- `GET /memit/weights`: fingerprints of every weight a patch touched since start, as served, next to
  the checkpoint's: after the last revert they are equal.
The last three need `Authorization: Bearer $MEMIT_VLLM_ADMIN_TOKEN` and are off when that variable
is unset in the server's environment.
"""

from __future__ import annotations

import hmac
import json
import os
from argparse import Namespace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import State

from memit_vllm.core.contract import (ADMIN_TOKEN_ENV, LOAD_FORMAT, LORA_METADATA_FILE, PATCHES_ROUTE, PLUGIN,
                                      WEIGHTS_ROUTE, WORKER_EXTENSION)
from memit_vllm.errors import MemitError

from .hot_swap import HotSwap, SwapError
from .patches import describe, load_patches


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _refusal(request: Request) -> JSONResponse | None:
    """Why this admin request may not proceed, or None."""
    state = request.app.state
    if state.memit_admin_token is None:
        return _error(403, f"memit admin routes are off: start the server with {ADMIN_TOKEN_ENV} set")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {state.memit_admin_token}".encode()):
        return _error(401, "missing or wrong admin token (Authorization: Bearer <token>)")
    if state.memit_swap is None:
        return _error(409, f"this server cannot change weights at run time: {state.memit_swap_why}")
    return None


async def _run(request: Request, action) -> JSONResponse:
    refused = _refusal(request)
    if refused:
        return refused
    try:
        return JSONResponse(await action(request.app.state.memit_swap))
    except SwapError as e:
        return _error(e.status, str(e))
    except MemitError as e:
        return _error(422, str(e))


def variants(lora_modules) -> dict[str, str]:
    """Model name -> patch id of each LoRA adapter exported from a patch (`--memit-variant`)."""
    out = {}
    for m in lora_modules:
        meta = Path(m.path) / LORA_METADATA_FILE
        if meta.is_file():
            out[m.name] = json.loads(meta.read_text())["patch_id"]
    return out


class PatchesEndpoint:
    name = PLUGIN
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        @app.get(PATCHES_ROUTE)
        async def memit_patches(request: Request) -> dict:
            state = request.app.state
            return {"patches": state.memit_swap.describe() if state.memit_swap else state.memit_patches,
                    "variants": state.memit_variants}

        @app.post(PATCHES_ROUTE)
        async def memit_apply(request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("path"), str):
                return _refusal(request) or _error(400, 'expected a JSON body {"path": "/path/to/file.patch"}')
            return await _run(request, lambda swap: swap.apply(body["path"]))

        @app.delete(PATCHES_ROUTE + "/{patch_id}")
        async def memit_revert(patch_id: str, request: Request) -> JSONResponse:
            return await _run(request, lambda swap: swap.revert(patch_id))

        @app.get(WEIGHTS_ROUTE)
        async def memit_weights(request: Request) -> JSONResponse:
            return await _run(request, lambda swap: swap.weight_hashes())

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        state.memit_admin_token = os.environ.get(ADMIN_TOKEN_ENV) or None
        memit = getattr(args, "load_format", None) == LOAD_FORMAT
        patches = load_patches(args.model_loader_extra_config or {}) if memit else []
        state.memit_patches = [describe(p) for p in patches]
        state.memit_variants = variants(getattr(args, "lora_modules", None) or [])
        state.memit_swap, state.memit_swap_why = None, ""
        if engine_client is None or not memit or getattr(args, "worker_extension_cls", None) != WORKER_EXTENSION:
            state.memit_swap_why = (f"start it with `memit-vllm serve` (load format {LOAD_FORMAT} and "
                                    f"--worker-extension-cls {WORKER_EXTENSION})")
        elif getattr(args, "enable_lora", False):
            state.memit_swap_why = ("LoRA variants (--memit-variant, --enable-lora) wrap the down-projections; "
                                    "hot-swap a server without variants, or roll variants by restarting")
        else:
            state.memit_swap = HotSwap(engine_client, args.model, patches)
