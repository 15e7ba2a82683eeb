"""The `/memit/...` routes: what a server serves, and (with an admin token) hot apply and revert; and a
middleware that names the weights behind every answer and stops traffic when the weights are unknown.

A `vllm.endpoint_plugins` entry point; vLLM loads it in the API server process only when
`VLLM_PLUGINS` names it (`memit-vllm serve` sets that).

- `GET /memit/patches`: the active patch stack and the patch behind each `--memit-variant` model, public
  like `/v1/models` (clients and deploy checks): ids, names, versions, facts, layers, lineage; with
  `?paths=true` and the admin token also the server-side files (on any server, hot swap or not).
- `POST /memit/patches {"path": NAME}`: apply the patch file NAME of MEMIT_VLLM_PATCH_DIR on top of the stack.
- `DELETE /memit/patches/{id}[?with_dependants=true]`: revert one patch (and the patches made on it).
- `GET /memit/weights`: fingerprints of every weight a patch touched since start, as served, next to
  the checkpoint's: after the last revert they are equal.
The last three need `Authorization: Bearer $MEMIT_VLLM_ADMIN_TOKEN` (checked before the body is read)
and are off when that variable is unset in the server's environment. Every answer is JSON.
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

from memit_vllm.core.contract import (ADMIN_TOKEN_ENV, LOAD_FORMAT, LORA_METADATA_FILE, MAX_ADMIN_BODY_BYTES,
                                      PATCHES_ROUTE, PLUGIN, SHOW_PATHS_PARAM, STACK_HEADER, STATE_DIR_ENV,
                                      VARIANT_HEADER, WEIGHTS_ROUTE, WITH_DEPENDANTS_PARAM, WORKER_EXTENSION)
from memit_vllm.errors import MemitError

from . import metrics
from .admin import admin_token, bearer_token, max_patch_bytes, patch_dir
from .compat import logger, served_dtype
from .hot_swap import HotSwap, SwapError
from .patches import describe, load_patches

# Routes that still answer while the weights are unknown (what an operator needs to see why).
_WHILE_UNHEALTHY = {("GET", PATCHES_ROUTE), ("GET", "/metrics")}
_MODEL_FIELD_BYTES = 1 << 20  # how much of a request body the middleware looks at for its `model`


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _refusal(request: Request, changes_weights: bool = True) -> JSONResponse | None:
    """Why this admin request may not proceed, or None. Needs the headers only: runs before the body is read."""
    state = request.app.state
    if state.memit_admin_token is None:
        return _error(403, f"memit admin routes are off: start the server with {ADMIN_TOKEN_ENV} set")
    given = bearer_token(request.headers.get("authorization", ""))
    if not hmac.compare_digest(given.encode(), state.memit_admin_token.encode()):
        return _error(401, "missing or wrong admin token (Authorization: Bearer <token>)")
    if changes_weights and state.memit_swap is None:
        return _error(409, f"this server cannot change weights at run time: {state.memit_swap_why}")
    return None


async def _body(request: Request) -> dict | None:
    """The JSON object of a body of at most MAX_ADMIN_BODY_BYTES (read no further), else None."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_ADMIN_BODY_BYTES:
        return None
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_ADMIN_BODY_BYTES:
            return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def _run(request: Request, action) -> JSONResponse:
    try:
        return JSONResponse(await action(request.app.state.memit_swap))
    except SwapError as e:
        return _error(e.status, str(e))
    except MemitError as e:
        return _error(422, str(e))
    except Exception as e:  # a bug or a vLLM failure: still a JSON answer, and the log has the traceback
        logger.exception("memit: %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); see the server log")


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


def variants(lora_modules) -> dict[str, dict]:
    """Model name -> {id, name, version} of the patch behind each LoRA adapter exported from a patch
    (`--memit-variant`)."""
    out = {}
    for m in lora_modules:
        meta = Path(m.path) / LORA_METADATA_FILE
        if meta.is_file():
            info = json.loads(meta.read_text())
            out[m.name] = {"id": info["patch_id"], "name": info.get("patch_name", ""),
                           "version": info.get("patch_version", "")}
    return out


def active_stack(state: State) -> list[dict]:
    return state.memit_swap.describe() if state.memit_swap else state.memit_patches


def stack_with_paths(state: State) -> list[dict]:
    """The active stack with each patch's `source` and `file` (admins): the operator's file and the copy
    the server keeps; a server without hot swap keeps no copy, so both are the file merged at load."""
    if state.memit_swap:
        return state.memit_swap.describe(paths=True)
    return [{**p, "source": f, "file": f} for p, f in zip(state.memit_patches, state.memit_patch_files)]


class MemitMiddleware:
    """Adds STACK_HEADER (the merged stack's ids) to every answer and VARIANT_HEADER to the answers of
    requests whose `model` is a variant, so gateway logs alone attribute an A/B split; answers 503 to
    everything but GET /memit/patches and /metrics once a failed rollback left the weights unknown."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not hasattr(scope["app"].state, "memit_patches"):
            return await self.app(scope, receive, send)
        state = scope["app"].state
        swap = state.memit_swap
        if swap is not None and swap.unhealthy and (scope["method"], scope["path"].rstrip("/")) not in _WHILE_UNHEALTHY:
            response = _error(503, f"the weights are in an unknown state ({swap.unhealthy}); restart the server")
            return await response(scope, receive, send)
        body = []
        watch = bool(state.memit_variants) and scope["method"] == "POST"

        async def receive_body():
            message = await receive()
            if watch and message["type"] == "http.request" and sum(map(len, body)) <= _MODEL_FIELD_BYTES:
                body.append(message.get("body", b""))
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                ids = ",".join(p["id"] for p in active_stack(state)) or "none"
                headers = [*message.get("headers", []), (STACK_HEADER.lower().encode(), ids.encode())]
                variant = _requested_variant(b"".join(body), state.memit_variants) if watch else None
                if variant:
                    headers.append((VARIANT_HEADER.lower().encode(), variant.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive_body, send_with_headers)


def _requested_variant(raw: bytes, known: dict[str, dict]) -> str | None:
    try:
        model = json.loads(raw).get("model")
    except (ValueError, AttributeError):
        return None
    return f"{model}={known[model]['id']}" if isinstance(model, str) and model in known else None


class PatchesEndpoint:
    name = PLUGIN
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_middleware(MemitMiddleware)

        @app.get(PATCHES_ROUTE)
        async def memit_patches(request: Request) -> JSONResponse:
            state = request.app.state
            answer = {"patches": active_stack(state),
                      "variants": {name: p["id"] for name, p in state.memit_variants.items()}}
            if state.memit_swap and state.memit_swap.unhealthy:
                answer["unhealthy"] = state.memit_swap.unhealthy
            if _flag(request, SHOW_PATHS_PARAM):
                refused = _refusal(request, changes_weights=False)
                if refused:
                    return refused
                answer["patches"] = stack_with_paths(state)
            return JSONResponse(answer)

        @app.post(PATCHES_ROUTE)
        async def memit_apply(request: Request) -> JSONResponse:
            refused = _refusal(request)
            if refused:
                return refused
            body = await _body(request)
            if body is None or not isinstance(body.get("path"), str):
                return _error(400, f'expected a JSON body of at most {MAX_ADMIN_BODY_BYTES} bytes: '
                                   '{"path": "FILE.patch"} (a file name in the patch directory)')
            return await _run(request, lambda swap: swap.apply(body["path"]))

        @app.delete(PATCHES_ROUTE + "/{patch_id}")
        async def memit_revert(patch_id: str, request: Request) -> JSONResponse:
            with_dependants = _flag(request, WITH_DEPENDANTS_PARAM)
            return _refusal(request) or await _run(request, lambda swap: swap.revert(patch_id, with_dependants))

        @app.get(WEIGHTS_ROUTE)
        async def memit_weights(request: Request) -> JSONResponse:
            return _refusal(request) or await _run(request, lambda swap: swap.weight_hashes())

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        state.memit_admin_token = admin_token(os.environ)  # a weak token stops the server here
        memit = getattr(args, "load_format", None) == LOAD_FORMAT
        patches = load_patches(args.model_loader_extra_config or {}) if memit else []
        state.memit_patches = [describe(p) for p in patches]
        state.memit_patch_files = [str(p.path) for p in patches]
        state.memit_variants = variants(getattr(args, "lora_modules", None) or [])
        state.memit_swap, state.memit_swap_why = None, ""
        if engine_client is None or not memit or getattr(args, "worker_extension_cls", None) != WORKER_EXTENSION:
            state.memit_swap_why = (f"start it with `memit-vllm serve` (load format {LOAD_FORMAT} and "
                                    f"--worker-extension-cls {WORKER_EXTENSION})")
        elif getattr(args, "enable_lora", False):
            state.memit_swap_why = ("LoRA variants (--memit-variant, --enable-lora) wrap the down-projections; "
                                    "hot-swap a server without variants, or roll variants by restarting")
        else:
            state_dir = os.environ.get(STATE_DIR_ENV)
            state.memit_swap = HotSwap(engine_client, args.model, patches, patch_dir=patch_dir(os.environ),
                                       max_patch_bytes=max_patch_bytes(os.environ),
                                       state_dir=Path(state_dir) if state_dir else None,
                                       dtype=served_dtype(engine_client))
        metrics.show_active(active_stack(state), state.memit_variants)
