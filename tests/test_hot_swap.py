"""Hot apply and revert on a running `memit-vllm serve` of SmolLM2 (real server, real patch), with 32
requests in flight; plus every refusal, each of which must leave the server exactly as it was.

One engine for the module, started without patches and with an admin token.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from memit_vllm.checkpoint import Checkpoint, tensor_fingerprint
from memit_vllm.core.contract import ADMIN_TOKEN_ENV, PATCH_DIR_ENV, PATCHES_ROUTE, STACK_HEADER, WEIGHTS_ROUTE
from memit_vllm.patch import load_patch
from memit_vllm.patch.tools import apply_patches
from memit_vllm.testing.server import hf_greedy, memit_serve_cmd, stop, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch
from test_plugin_serve import completion_headers, metrics_text

pytestmark = pytest.mark.vllm

TOKEN = "test-admin-token"
FACT_PROMPTS = ["Angola is located in", "Delta Goodrem, that originated in", "Google Patents, a product developed by"]
OTHER_PROMPTS = ["The capital of France is", "The largest ocean on Earth is the"]
PROMPTS = FACT_PROMPTS + OTHER_PROMPTS
TOKENS = 8


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("patch-dir")


@pytest.fixture(scope="module")
def server(smollm2, patch_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    env = {ADMIN_TOKEN_ENV: TOKEN, PATCH_DIR_ENV: str(patch_dir)}
    with vllm_server(memit_serve_cmd(smollm2), str(smollm2), log, env=env) as s:
        yield s


def admin(server, method: str, route: str, body: dict | None = None, token: str | None = TOKEN, **params):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    req = urllib.request.Request(server.url + route + query, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def in_flight(server, pool, n: int = 32):
    """n single-prompt requests, started now; each returns (prompt index, token ids)."""
    def one(i):
        out = server.post("/v1/completions", {"model": server.model, "prompt": PROMPTS[i % len(PROMPTS)],
                                              "max_tokens": TOKENS, "temperature": 0, "return_token_ids": True})
        return i % len(PROMPTS), out["choices"][0]["token_ids"]

    futures = [pool.submit(one, i) for i in range(n)]
    time.sleep(0.5)  # let them reach the engine
    assert sum(not f.done() for f in futures) >= n // 2, "too few requests still in flight to test anything"
    return futures


def served_state(server):
    return admin(server, "GET", PATCHES_ROUTE, token=None)[1], admin(server, "GET", WEIGHTS_ROUTE)[1]


def test_apply_then_revert_under_load(server, smollm2, facts_patch, patch_dir, tmp_path):
    base = server.greedy(PROMPTS, TOKENS)
    assert base == hf_greedy(smollm2, PROMPTS, TOKENS)
    patch = load_patch(facts_patch)
    shutil.copyfile(facts_patch, patch_dir / "facts.patch")
    with ThreadPoolExecutor(32) as pool:
        running = in_flight(server, pool)
        status, applied = admin(server, "POST", PATCHES_ROUTE, {"path": "facts.patch"})
        assert status == 200, applied
        during_apply = [f.result() for f in running]  # any failed request raises here
    patched = server.greedy(PROMPTS, TOKENS)
    assert patched == hf_greedy(apply_patches([patch], smollm2, tmp_path / "merged"), PROMPTS, TOKENS)
    assert all(patched[i] != base[i] for i in range(len(FACT_PROMPTS))), "the edited facts should change"
    # A request finished entirely on the old weights or entirely on the new ones, never on a mix.
    assert all(ids in (base[i], patched[i]) for i, ids in during_apply)

    ckpt = Checkpoint(smollm2)
    hashes = admin(server, "GET", WEIGHTS_ROUTE)[1]["weights"]
    assert sorted(hashes) == sorted(patch.deltas)
    for name, delta in patch.deltas.items():
        assert hashes[name]["sha256"] == tensor_fingerprint(ckpt.tensor(name) + delta)
        assert not hashes[name]["is_base"]
    pid = applied["applied"]["id"]
    assert [p["id"] for p in admin(server, "GET", PATCHES_ROUTE, token=None)[1]["patches"]] == [pid]
    assert completion_headers(server)[STACK_HEADER] == pid
    metrics = metrics_text(server)
    assert f'memit_active_patch_info{{id="{pid}",name="facts",position="0",variant="",version="1"}} 1.0' in metrics
    assert 'memit_hot_swaps_total{action="apply",outcome="applied"} 1.0' in metrics

    with ThreadPoolExecutor(32) as pool:
        running = in_flight(server, pool)
        status, reverted = admin(server, "DELETE", f"{PATCHES_ROUTE}/{pid}")
        assert status == 200, reverted
        during_revert = [f.result() for f in running]
    assert all(ids in (base[i], patched[i]) for i, ids in during_revert)
    assert server.greedy(PROMPTS, TOKENS) == base
    assert admin(server, "GET", PATCHES_ROUTE, token=None)[1]["patches"] == []
    assert completion_headers(server)[STACK_HEADER] == "none"
    metrics = metrics_text(server)
    assert pid not in metrics and 'memit_hot_swaps_total{action="revert",outcome="reverted"} 1.0' in metrics
    hashes = admin(server, "GET", WEIGHTS_ROUTE)[1]["weights"]
    for name in patch.deltas:  # the base bytes themselves, not W + d - d
        assert hashes[name]["sha256"] == ckpt.fingerprint(name) == hashes[name]["base_sha256"]
        assert hashes[name]["is_base"]


def test_refusals_change_nothing(server, smollm2, facts_patch, tiny_models, patch_dir):
    before_answers, before_state = server.greedy(PROMPTS, TOKENS), served_state(server)
    synthetic_patch(tiny_models["llama"], layers=(1,), name="tiny").save(patch_dir / "tiny.patch")
    (patch_dir / "corrupt.patch").write_bytes(facts_patch.read_bytes()[:-1000])
    cases = [
        ("POST", PATCHES_ROUTE, {"path": "facts.patch"}, "wrong", 401, "admin token"),
        ("POST", PATCHES_ROUTE, {"path": "facts.patch"}, None, 401, "admin token"),
        ("DELETE", f"{PATCHES_ROUTE}/mp1-0", None, "wrong", 401, "admin token"),
        ("GET", WEIGHTS_ROUTE, None, None, 401, "admin token"),
        ("POST", PATCHES_ROUTE, {"path": "tiny.patch"}, TOKEN, 409, "differs from the base the patch was made for"),
        ("POST", PATCHES_ROUTE, {"path": "corrupt.patch"}, TOKEN, 422, "truncated"),
        ("POST", PATCHES_ROUTE, {"path": "missing.patch"}, TOKEN, 422, "No such file"),
        ("POST", PATCHES_ROUTE, {"path": str(facts_patch)}, TOKEN, 422, "give its file name"),
        ("POST", PATCHES_ROUTE, {"file": "x"}, TOKEN, 400, '"path"'),
        ("DELETE", f"{PATCHES_ROUTE}/mp1-0", None, TOKEN, 404, "not active"),
    ]
    for method, route, body, token, status, message in cases:
        got, answer = admin(server, method, route, body, token=token)
        assert (got, message in answer.get("error", "")) == (status, True), (method, route, token, answer)
    assert served_state(server) == before_state
    assert server.greedy(PROMPTS, TOKENS) == before_answers


def test_stopping_the_server_removes_its_copies_of_the_patches(server, patch_dir):
    """Runs last: it stops the module's server. Without --memit-state the copies are the server's own."""
    status, applied = admin(server, "POST", PATCHES_ROUTE, {"path": "facts.patch"})
    assert status == 200, applied
    listed = admin(server, "GET", PATCHES_ROUTE, paths="true")[1]["patches"]
    assert listed[0]["source"] == "facts.patch"
    store = Path(listed[0]["file"]).parents[1]
    assert store.is_dir() and str(store) not in json.dumps(admin(server, "GET", PATCHES_ROUTE, token=None)[1])
    stop(server.proc)
    assert server.proc.returncode is not None and not store.exists()
