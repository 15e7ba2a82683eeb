"""`GET /memit/patches`: the patches this server merged, for clients and deploy checks.

A `vllm.endpoint_plugins` entry point; vLLM loads it in the API server process only when
`VLLM_PLUGINS` names it (`memit-vllm serve` sets that). The server only comes up when the engine
merged every configured patch, so the configured list is the active list.
"""

from __future__ import annotations

from argparse import Namespace

from fastapi import FastAPI, Request
from starlette.datastructures import State

from .patches import describe, load_patches

ROUTE = "/memit/patches"


class PatchesEndpoint:
    name = "memit_vllm"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        @app.get(ROUTE)
        async def memit_patches(request: Request) -> dict:
            return {"patches": request.app.state.memit_patches}

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        if getattr(args, "load_format", None) == "memit":
            state.memit_patches = [describe(p) for p in load_patches(args.model_loader_extra_config or {})]
        else:
            state.memit_patches = []
