"""Tensor parallelism on CPU: `memit-vllm serve --tensor-parallel-size 2` of a tiny Llama (two heads, so
each rank holds half of every down-projection's input columns). The loader merges the full deltas
before vLLM slices them per rank, hot apply/revert reloads through the same slicing, and the weights
route assembles both ranks' slices: every step is checked against the HF-merged model.

One engine for the module. vLLM's CPU workers need one core each, bound by hand on a one-NUMA-node
machine (VLLM_CPU_OMP_THREADS_BIND, as the README says).
"""

from __future__ import annotations

import os
import shutil
from functools import reduce
from operator import add

import pytest

from memit_vllm.checkpoint import Checkpoint, tensor_fingerprint
from memit_vllm.core.contract import ADMIN_TOKEN_ENV, PATCH_DIR_ENV, PATCHES_ROUTE, WEIGHTS_ROUTE
from memit_vllm.patch import load_patch
from memit_vllm.patch.tools import apply_patches
from memit_vllm.testing.server import hf_greedy, memit_serve_cmd, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch
from test_hot_swap import TOKEN, admin

pytestmark = pytest.mark.vllm

PROMPTS = ["The capital of France is", "Angola is located in", "Hello, my name is"]
TOKENS = 8
CPUS = sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def patches(model, tmp_path_factory):
    """Two patches on different layers: the first served from startup, the second applied hot."""
    root = tmp_path_factory.mktemp("tp-patches")
    return [load_patch(synthetic_patch(model, layers=layers, seed=seed, scale=0.5).save(root / f"p{seed}.patch"))
            for seed, layers in ((1, (1, 2)), (2, (2, 3)))]


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tp-patch-dir")


@pytest.fixture(scope="module")
def server(model, patches, patch_dir, tmp_path_factory):
    if len(CPUS) < 2:
        pytest.skip(f"tensor parallelism on CPU needs two cores for its two workers; this process may use {CPUS}")
    log = tmp_path_factory.mktemp("logs") / "serve-tp2.log"
    env = {ADMIN_TOKEN_ENV: TOKEN, PATCH_DIR_ENV: str(patch_dir), "VLLM_CPU_OMP_THREADS_BIND": f"{CPUS[0]}|{CPUS[1]}"}
    cmd = memit_serve_cmd(model, patches[0].path) + ["--tensor-parallel-size", "2"]
    with vllm_server(cmd, str(model), log, env=env) as s:
        yield s


def check_served(server, model, stack, tmp_path, name: str) -> list[list[int]]:
    """Served tokens equal the HF-merged stack's; the weights route's hashes (both ranks' slices put
    together) equal base + deltas (added in stack order, as the merge does), and the base bytes
    themselves for weights no active patch touches."""
    served = server.greedy(PROMPTS, TOKENS)
    reference = apply_patches(stack, model, tmp_path / name) if stack else model
    assert served == hf_greedy(reference, PROMPTS, TOKENS)
    ckpt = Checkpoint(model)
    for weight, h in admin(server, "GET", WEIGHTS_ROUTE)[1]["weights"].items():
        deltas = [p.deltas[weight] for p in stack if weight in p.deltas]
        expected = tensor_fingerprint(reduce(add, deltas, ckpt.tensor(weight))) if deltas else ckpt.fingerprint(weight)
        assert h["sha256"] == expected, weight
        assert h["is_base"] == (not deltas)
    return served


def test_loader_merge_and_hot_swap_under_tensor_parallelism(server, model, patches, patch_dir, tmp_path):
    first, second = patches
    at_start = check_served(server, model, [first], tmp_path, "first")

    shutil.copyfile(second.path, patch_dir / "second.patch")
    status, applied = admin(server, "POST", PATCHES_ROUTE, {"path": "second.patch"})
    assert status == 200, applied
    both = check_served(server, model, [first, second], tmp_path, "both")
    assert both != at_start, "the hot-applied patch should change the served tokens"

    status, reverted = admin(server, "DELETE", f"{PATCHES_ROUTE}/{second.patch_id}")
    assert status == 200, reverted
    assert check_served(server, model, [first], tmp_path, "first-again") == at_start

    status, reverted = admin(server, "DELETE", f"{PATCHES_ROUTE}/{first.patch_id}")
    assert status == 200, reverted
    base = check_served(server, model, [], tmp_path, "base")
    assert base != at_start, "the startup patch should have changed the served tokens"
