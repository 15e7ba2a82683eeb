"""The admin routes under faults and abuse, in process: the real `/memit` routes, middleware and HotSwap
behind Starlette's TestClient, on a fake engine with two workers (the real worker extension on tiny HF
models; only vLLM's layer reload is replaced by a copy). Each case ends in the state the README promises:
refusals change nothing, a failed reload restores the previous weights, a failed rollback leaves a
server that refuses all traffic. Seconds to run, no vLLM server.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import shutil
import threading
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI
from prometheus_client import REGISTRY, make_asgi_app
from safetensors.torch import load_file, save_file
from starlette.routing import Mount
from starlette.testclient import TestClient
from transformers import AutoModelForCausalLM

import memit_vllm_plugin.hot_swap as hot_swap_module
import memit_vllm_plugin.worker as worker_module
from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.contract import (ADMIN_TOKEN_ENV, DRAIN_TIMEOUT_ENV, LOAD_FORMAT, MAX_ADMIN_BODY_BYTES,
                                      PATCH_DIR_ENV, PATCHES_KEY, PATCHES_ROUTE, RPC_TIMEOUT_ENV, STACK_HEADER,
                                      STATE_DIR_ENV, STATE_FILE, WEIGHTS_ROUTE, WORKER_EXTENSION)
from memit_vllm.errors import MemitError
from memit_vllm.patch import Patch, load_patch
from memit_vllm.patch.merge import PatchSet
from memit_vllm.testing.synthetic import edit_header, synthetic_patch
from memit_vllm_plugin.admin import read_state, write_state
from memit_vllm_plugin.endpoint import PatchesEndpoint
from memit_vllm_plugin.worker import MemitWorkerExtension

TOKEN = "0123456789abcdef-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HANG = 3600.0


class FakeWorker(MemitWorkerExtension):
    """A worker as vLLM builds it, as far as the extension looks: a model and its config, with the
    startup patches merged as the loader merges them."""

    def __init__(self, model_dir: Path, startup: list[Path]):
        self.model_config = SimpleNamespace(model=str(model_dir), dtype=torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if startup:
            stack = PatchSet([load_patch(p) for p in startup])
            with torch.no_grad():
                for n in stack.names:
                    self.model.get_parameter(n).copy_(stack.merge(n, self.model.get_parameter(n).detach()))

    def get_model(self):
        return self.model

    def down_proj(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name).detach().clone()


class FakeEngine:
    """vLLM's EngineClient as the admin routes use it. `faults[rank]` is a list of what the next RPCs to
    that worker do ("fail": raise a bare Exception, as vLLM reports worker failures; "hang")."""

    def __init__(self, model_dir: Path, startup: list[Path]):
        self.model_config = SimpleNamespace(dtype=torch.float32)
        self.workers = [FakeWorker(model_dir, startup), FakeWorker(model_dir, startup)]
        self.faults: list[list[str]] = [[], []]
        self.paused = False
        self.drain_hangs = False
        self.resume_fails = False

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        if self.drain_hangs:
            await asyncio.sleep(HANG)
        self.paused = True

    async def resume_generation(self) -> None:
        if self.resume_fails:
            raise Exception("engine core died")
        self.paused = False

    async def reset_prefix_cache(self) -> None:
        pass

    async def collective_rpc(self, method: str, args=()) -> list:
        out = []
        for rank, w in enumerate(self.workers):
            fault = self.faults[rank].pop(0) if self.faults[rank] else None
            if fault == "hang":
                await asyncio.sleep(HANG)
            if fault == "fail":
                raise Exception(f"worker {rank} died")
            out.append(await asyncio.to_thread(getattr(w, method), *args))
        return out


def copy_weights(worker, modules, weights) -> None:
    """vLLM's layer-wise reload, for HF Linear modules (stored in the checkpoint's layout)."""
    with torch.no_grad():
        for module, (_, tensor) in zip(modules, weights):
            module.weight.copy_(tensor)


class Server:
    def __init__(self, root: Path, model: Path, startup: list[Path], env: dict[str, str], monkeypatch,
                 **args):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(worker_module, "reload_layers", copy_weights)
        self.model, self.root = model, root
        self.engine = FakeEngine(model, startup)
        self.app = FastAPI()
        self.app.get("/health")(lambda: {})
        self.app.post("/v1/completions")(lambda: {"choices": []})
        self.app.routes.append(Mount("/metrics", make_asgi_app()))
        PatchesEndpoint().attach_router(self.app)
        args = Namespace(**{"model": str(model), "load_format": LOAD_FORMAT, "worker_extension_cls": WORKER_EXTENSION,
                            "model_loader_extra_config": {PATCHES_KEY: [str(p) for p in startup]},
                            "enable_lora": False, "lora_modules": None, **args})
        asyncio.run(PatchesEndpoint().init_state(self.engine, self.app.state, args))
        self.swap = self.app.state.memit_swap
        self.client = TestClient(self.app)

    def admin(self, method: str, route: str, body: dict | None = None, headers=AUTH, **params):
        r = self.client.request(method, route, json=body, headers=headers, params=params)
        assert r.headers["content-type"].startswith("application/json"), r.text
        return r.status_code, r.json()

    def stack(self) -> list[str]:
        return [p["id"] for p in self.client.get(PATCHES_ROUTE).json()["patches"]]

    def weights(self, names) -> list[dict[str, torch.Tensor]]:
        return [{n: w.down_proj(n) for n in names} for w in self.engine.workers]

    def assert_serves(self, patches: list[Patch], names, running: bool = True) -> None:
        """Both workers hold base + these patches' deltas on `names`, and the engine runs (unless not `running`)."""
        ckpt = Checkpoint(self.model)
        for held in self.weights(names):
            for n in names:
                expected = ckpt.tensor(n)
                for p in patches:  # W + d1 + ... + dn, in fp32, in stack order
                    expected = expected + p.deltas[n] if n in p.deltas else expected
                assert torch.equal(held[n], expected), n
        assert self.engine.paused != running
        assert self.stack() == [p.patch_id for p in patches]


@pytest.fixture
def model(tiny_models, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "llama"))


@pytest.fixture
def patch_dir(tmp_path) -> Path:
    (tmp_path / "patches").mkdir()
    return tmp_path / "patches"


@pytest.fixture
def patches(model, patch_dir) -> list[Path]:
    return [synthetic_patch(model, layers=layers, seed=seed, name=f"p{seed}").save(patch_dir / f"p{seed}.patch")
            for seed, layers in ((1, (1, 2)), (2, (2, 3)))]


def make_server(tmp_path, model, patch_dir, monkeypatch, startup=(), args=None, **env) -> Server:
    base_env = {ADMIN_TOKEN_ENV: TOKEN, PATCH_DIR_ENV: str(patch_dir), DRAIN_TIMEOUT_ENV: "1",
                RPC_TIMEOUT_ENV: "1"}
    return Server(tmp_path, model, list(startup), {**base_env, **env}, monkeypatch, **(args or {}))


@pytest.fixture
def server(tmp_path, model, patch_dir, patches, monkeypatch) -> Server:
    return make_server(tmp_path, model, patch_dir, monkeypatch, startup=patches[:1])


NAMES = [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)]


def test_apply_and_revert_reach_both_workers_and_show_in_metrics_and_headers(server, patches):
    p1, p2 = (load_patch(p) for p in patches)
    server.assert_serves([p1], NAMES)
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})
    assert status == 200, answer
    server.assert_serves([p1, p2], NAMES)
    assert server.client.post("/v1/completions").headers[STACK_HEADER] == f"{p1.patch_id},{p2.patch_id}"
    metrics = server.client.get("/metrics").text
    assert f'memit_active_patch_info{{id="{p2.patch_id}",name="p2",position="1",variant="",version="1"}} 1.0' in metrics
    assert server.admin("DELETE", f"{PATCHES_ROUTE}/{p2.patch_id}")[0] == 200
    server.assert_serves([p1], NAMES)
    metrics = server.client.get("/metrics").text
    assert p2.patch_id not in metrics and p1.patch_id in metrics
    assert 'memit_hot_swaps_total{action="revert",outcome="reverted"}' in metrics
    hashes = server.admin("GET", WEIGHTS_ROUTE)[1]["weights"]
    assert hashes[NAMES[2]]["is_base"] and not hashes[NAMES[0]]["is_base"]


def test_an_apply_hashes_only_the_new_patch_and_before_the_drain(server, patches, model, patch_dir, monkeypatch):
    """The kept copies are the validated bytes: an apply hashes the new patch (and a startup copy, once)
    while requests still flow; neither the server nor the workers read the active patches again."""
    hashed, content_id = [], Patch.content_id
    monkeypatch.setattr(Patch, "content_id",
                        lambda p, **a: hashed.append((p.name, server.engine.paused)) or content_id(p, **a))
    p1, p2 = (load_patch(p) for p in patches)
    p3 = load_patch(synthetic_patch(model, layers=(3,), seed=3, name="p3").save(patch_dir / "p3.patch"))
    hashed.clear()
    assert server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})[0] == 200
    assert sorted(hashed) == [("p1", False), ("p2", False)]
    hashed.clear()
    assert server.admin("POST", PATCHES_ROUTE, {"path": "p3.patch"})[0] == 200
    assert hashed == [("p3", False)]
    server.assert_serves([p1, p2, p3], NAMES)


def test_a_kept_copy_changed_on_disk_is_hashed_again_before_the_drain(server, patches):
    """A kept copy found in another state than it was verified in is hashed again: the same bytes pass,
    other bytes refuse the change before requests are held (the workers check the state too)."""
    p1, p2 = (load_patch(p) for p in patches)
    assert server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})[0] == 200
    kept = server.swap.active[0].path
    os.utime(kept, ns=(0, 10**9))  # touched: the same bytes
    assert server.admin("DELETE", f"{PATCHES_ROUTE}/{p2.patch_id}")[0] == 200
    server.assert_serves([p1], NAMES)
    raw = bytearray(kept.read_bytes())
    raw[-4:] = torch.tensor([0.5]).numpy().tobytes()  # one delta value, in place: same size
    kept.write_bytes(bytes(raw))
    os.utime(kept, ns=(0, 2 * 10**9))
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})
    assert status == 409 and "changed on disk since it was applied" in answer["error"], answer
    assert "does not match its patch id" in answer["error"]
    server.assert_serves([p1], NAMES)
    assert server.client.get("/health").status_code == 200
    stale = server.swap.verified[p1.patch_id]  # the state it was verified in
    with pytest.raises(MemitError, match="changed on disk after it was validated"):
        server.engine.workers[0].memit_reload([str(kept)], [p1.patch_id], [stale], [NAMES[0]], {})


def test_failed_reload_restores_the_previous_weights(server, patches):
    p1 = load_patch(patches[0])
    server.engine.faults[1] = ["fail"]
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})
    assert status == 500 and "worker 1 died" in answer["error"] and "previous patch set is restored" in answer["error"]
    server.assert_serves([p1], NAMES)
    assert sorted(x.name for x in server.swap.store.iterdir()) == [p1.patch_id]
    assert server.client.get("/health").status_code == 200
    assert sorted(server.admin("GET", WEIGHTS_ROUTE)[1]["weights"]) == NAMES[:2]  # p2's own weight never touched


@pytest.mark.parametrize("fault", ["fail", "hang"])
def test_failed_rollback_leaves_a_server_that_refuses_all_traffic(server, patches, fault):
    server.engine.faults[1] = [fault, fault]
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})
    assert status == 500 and "weights are unknown" in answer["error"], answer
    assert server.engine.paused  # no generation on unknown weights
    assert server.client.get("/health").status_code == 503
    assert server.client.post("/v1/completions").status_code == 503
    assert server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})[0] == 503
    listed = server.client.get(PATCHES_ROUTE).json()
    assert listed["unhealthy"] and "restoring the previous weights failed" in listed["unhealthy"]
    assert 'outcome="failed"' in server.client.get("/metrics").text


def test_a_failed_resume_after_the_reload_keeps_the_change_and_its_record(tmp_path, model, patch_dir, patches,
                                                                          monkeypatch):
    """The weights are the new stack: the stack shown, the kept copy and the state file must say so too
    (a restart serves it), while the server refuses traffic as after a failed rollback."""
    state = tmp_path / "state"
    server = make_server(tmp_path, model, patch_dir, monkeypatch, startup=patches[:1], **{STATE_DIR_ENV: str(state)})
    p1, p2 = (load_patch(p) for p in patches)
    server.engine.resume_fails = True
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})
    assert status == 500 and "resuming the engine failed" in answer["error"], answer
    assert "the change is made" in answer["error"]
    assert server.client.get("/health").status_code == 503
    server.assert_serves([p1, p2], NAMES, running=False)
    listed = server.client.get(PATCHES_ROUTE, headers=AUTH, params={"paths": "true"}).json()
    assert listed["unhealthy"] and listed["patches"][1]["source"] == "p2.patch"
    assert all(Path(p["file"]).is_file() for p in listed["patches"])
    recorded = read_state(state)
    assert [p.patch_id for p in recorded] == [p1.patch_id, p2.patch_id]
    make_server(tmp_path, model, patch_dir, monkeypatch, startup=[p.path for p in recorded],
                **{STATE_DIR_ENV: str(state)}).assert_serves([p1, p2], NAMES)


def test_a_failed_state_write_keeps_the_change_served_and_says_so(tmp_path, model, patch_dir, patches, monkeypatch):
    """The weights changed and the server serves them; the state file still records the previous stack
    (with the kept copies it names), so a restart serves that one until a later change records again."""
    state = tmp_path / "state"
    server = make_server(tmp_path, model, patch_dir, monkeypatch, startup=patches[:1], **{STATE_DIR_ENV: str(state)})
    p1, p2 = (load_patch(p) for p in patches)

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(hot_swap_module, "write_state", disk_full)
    applied = {"action": "apply", "outcome": "applied"}
    before = REGISTRY.get_sample_value("memit_hot_swaps_total", applied) or 0
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})
    assert status == 500 and f"patch {p2.patch_id} is applied and served" in answer["error"], answer
    assert STATE_FILE in answer["error"] and os.strerror(errno.ENOSPC) in answer["error"]
    assert "still records the last stack written" in answer["error"]
    server.assert_serves([p1, p2], NAMES)
    assert server.client.get("/health").status_code == 200
    assert REGISTRY.get_sample_value("memit_hot_swaps_total", applied) == before + 1
    assert [p.patch_id for p in read_state(state)] == [p1.patch_id]

    status, answer = server.admin("DELETE", f"{PATCHES_ROUTE}/{p1.patch_id}")
    assert status == 500 and f"{p1.patch_id} reverted" in answer["error"], answer
    server.assert_serves([p2], NAMES)
    assert [p.patch_id for p in read_state(state)] == [p1.patch_id]  # its copy is kept: a restart works

    monkeypatch.setattr(hot_swap_module, "write_state", write_state)  # space again: the next change records all
    assert server.admin("DELETE", f"{PATCHES_ROUTE}/{p2.patch_id}")[0] == 200
    assert read_state(state) == [] and list(server.swap.store.iterdir()) == []


def test_drain_timeout_changes_nothing(server, patches):
    server.engine.drain_hangs = True
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})
    assert status == 503 and DRAIN_TIMEOUT_ENV in answer["error"]
    server.assert_serves([load_patch(patches[0])], NAMES)


def test_concurrent_apply_and_revert_serialize(server, patches):
    p1, p2 = (load_patch(p) for p in patches)
    answers = {}

    def run(key, method, route, body=None):
        answers[key] = server.admin(method, route, body)

    threads = [threading.Thread(target=run, args=("apply", "POST", PATCHES_ROUTE, {"path": "p2.patch"})),
               threading.Thread(target=run, args=("revert", "DELETE", f"{PATCHES_ROUTE}/{p1.patch_id}"))]
    with server.client:  # one event loop for both requests, as in a server
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert answers["apply"][0] == answers["revert"][0] == 200, answers
    server.assert_serves([p2], NAMES)


def test_duplicate_and_tensorless_patches_are_refused_and_leave_nothing(server, patches, patch_dir):
    p1 = load_patch(patches[0])
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "p1.patch"})
    assert status == 409 and "given twice" in answer["error"]
    empty = Patch(deltas={}, base=p1.base, base_weights={}, requests=[], name="empty").save(patch_dir / "e.patch")
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "e.patch"})
    assert status == 422 and "holds no weight deltas" in answer["error"]
    raw = empty.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].decode().rstrip()
    doubled = header[:-1] + "," + header[1:]  # {"__metadata__": {...}, "__metadata__": {...}}
    (patch_dir / "dup.patch").write_bytes(len(doubled).to_bytes(8, "little") + doubled.encode())
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "dup.patch"})
    assert status == 422 and "not a valid safetensors file" in answer["error"]
    server.assert_serves([p1], NAMES)
    assert sorted(x.name for x in server.swap.store.iterdir()) == [p1.patch_id]


def test_files_outside_the_patch_dir_are_refused_unread(server, patches, patch_dir, tmp_path):
    outside = synthetic_patch(server.model, layers=(3,), seed=5).save(tmp_path / "outside.patch")
    (patch_dir / "link.patch").symlink_to(outside)
    (patch_dir / "zero.patch").symlink_to("/dev/zero")
    os.mkfifo(patch_dir / "fifo.patch")
    cases = {str(outside): "give its file name", "../outside.patch": "resolves outside",
             "link.patch": "resolves outside", "/dev/zero": "give its file name", "zero.patch": "resolves outside",
             "fifo.patch": "not a regular file",
             "missing.patch": "No such file", "": "give its file name", "p1\0.patch": "give its file name"}
    for name, why in cases.items():
        status, answer = server.admin("POST", PATCHES_ROUTE, {"path": name})
        assert status == 422 and why in answer["error"], (name, answer)
    server.assert_serves([load_patch(patches[0])], NAMES)


def test_no_byte_of_a_refused_file_in_any_answer(server, patch_dir):
    secret = Path("/etc/passwd").read_bytes()
    (patch_dir / "passwd.patch").write_bytes(secret)
    (patch_dir / "passwd-link.patch").symlink_to("/etc/passwd")
    # A safetensors header made of its lines: safetensors quotes what it cannot parse.
    lines = [x for x in secret.decode(errors="replace").splitlines() if x][:5]
    header = json.dumps({line: {"dtype": line, "shape": [1], "data_offsets": [0, 4]} for line in lines}).encode()
    (patch_dir / "quoted.patch").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    words = {w for w in secret.decode(errors="replace").replace("\n", ":").split(":") if len(w) >= 4}
    for name in ("passwd.patch", "passwd-link.patch", "quoted.patch", "/etc/passwd", "../../../../etc/passwd"):
        status, answer = server.admin("POST", PATCHES_ROUTE, {"path": name})
        text = json.dumps(answer)
        assert status == 422 and not [w for w in words if w in text], (name, text)


def test_auth_comes_before_the_body_and_bodies_are_bounded(server):
    def post(headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, int]:
        """POST `chunks` x 64 KiB straight to the ASGI app; (status, chunks it read)."""
        read, sent = [0], []

        async def receive():
            read[0] += 1
            return {"type": "http.request", "body": b"x" * 65536, "more_body": read[0] < chunks}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": PATCHES_ROUTE, "raw_path": PATCHES_ROUTE.encode(),
                 "query_string": b"", "headers": headers, "http_version": "1.1", "scheme": "http",
                 "server": ("test", 80), "client": ("test", 1), "root_path": ""}
        asyncio.run(server.app(scope, receive, send))
        return sent[0]["status"], read[0]

    assert post([], chunks=1000) == (401, 0)
    assert post([(b"authorization", b"Bearer wrong-token-123456")], chunks=1000) == (401, 0)
    auth = [(b"authorization", f"bearer {TOKEN}".encode())]  # the scheme in any case
    status, read = post(auth, chunks=1000)
    assert status == 400 and read * 65536 <= MAX_ADMIN_BODY_BYTES + 65536
    declared = [*auth, (b"content-length", str(1000 * 65536).encode())]
    assert post(declared, chunks=1000) == (400, 0)


@pytest.mark.parametrize("token, why", [("short", "fewer than 16"), (TOKEN + " ", "whitespace")])
def test_a_weak_token_stops_the_server(tmp_path, model, patch_dir, monkeypatch, token, why):
    with pytest.raises(MemitError, match=why):
        make_server(tmp_path, model, patch_dir, monkeypatch, **{ADMIN_TOKEN_ENV: token})


def test_public_answers_show_no_server_paths(server, tmp_path):
    text = json.dumps(server.client.get(PATCHES_ROUTE).json())
    assert str(tmp_path) not in text and "/tmp" not in text and str(server.swap.store) not in text
    status, answer = server.admin("GET", PATCHES_ROUTE, paths="true")
    assert status == 200 and answer["patches"][0]["source"].endswith("p1.patch")
    assert server.client.get(PATCHES_ROUTE, params={"paths": "true"}).status_code == 401
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": "missing.patch"})
    assert str(tmp_path) not in answer["error"] and str(os.getpid()) not in answer["error"]


@pytest.mark.parametrize("why", ["no worker extension", "LoRA variants"])
def test_paths_are_listed_without_hot_swap_too(tmp_path, model, patch_dir, patches, monkeypatch, why):
    """A server that cannot change weights still lists its patches' files to the token holder: the files
    it merged at load (it keeps no copy of them)."""
    args = {"worker_extension_cls": None} if why == "no worker extension" else {"enable_lora": True}
    server = make_server(tmp_path, model, patch_dir, monkeypatch, startup=patches[:1], args=args)
    assert server.swap is None
    public = server.client.get(PATCHES_ROUTE).json()
    status, answer = server.admin("GET", PATCHES_ROUTE, paths="true")
    assert status == 200, answer
    [listed] = answer["patches"]
    assert listed == {**public["patches"][0], "source": str(patches[0]), "file": str(patches[0])}
    assert answer["variants"] == public["variants"]
    assert server.client.get(PATCHES_ROUTE, params={"paths": "true"}).status_code == 401
    assert server.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})[0] == 409  # still no hot apply
    off = make_server(tmp_path, model, patch_dir, monkeypatch, startup=patches[:1], args=args,
                      **{ADMIN_TOKEN_ENV: ""})
    assert off.admin("GET", PATCHES_ROUTE, paths="true")[0] == 403


def test_revert_of_a_patch_others_were_made_on_names_them(server, patches, patch_dir):
    p1 = load_patch(patches[0])
    on = synthetic_patch(server.model, layers=(3,), seed=7, name="on")
    on = Patch(**{**{k: v for k, v in on.__dict__.items() if not k.startswith("_")}, "made_on": [p1.patch_id]})
    on.save(patch_dir / "on.patch")
    assert server.admin("POST", PATCHES_ROUTE, {"path": "on.patch"})[0] == 200
    assert server.client.get(PATCHES_ROUTE).json()["patches"][1]["made_on"] == [p1.patch_id]
    status, answer = server.admin("DELETE", f"{PATCHES_ROUTE}/{p1.patch_id}")
    assert status == 409 and on.patch_id in answer["error"] and "with_dependants=true" in answer["error"]
    status, answer = server.admin("DELETE", f"{PATCHES_ROUTE}/{p1.patch_id}", with_dependants="true")
    assert status == 200 and [p["id"] for p in answer["reverted"]] == [p1.patch_id, on.patch_id]
    server.assert_serves([], NAMES)


def test_revert_refuses_a_checkpoint_changed_on_disk(server, patches, model):
    shard = model / "model.safetensors"
    tensors = load_file(shard)
    tensors[NAMES[0]] = tensors[NAMES[0]] + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    status, answer = server.admin("DELETE", f"{PATCHES_ROUTE}/{load_patch(patches[0]).patch_id}")
    assert status == 409 and "changed on disk" in answer["error"]
    assert server.stack() == [load_patch(patches[0]).patch_id] and not server.engine.paused
    # The workers check it again as they read (the checkpoint may change between the two).
    with pytest.raises(MemitError, match="changed on disk"):
        server.engine.workers[0].memit_reload([], [], [], [NAMES[0]], {NAMES[0]: server.swap.base[NAMES[0]]})


def test_worker_failure_outside_a_swap_is_a_json_500(server):
    server.engine.faults[0] = ["fail"]
    status, answer = server.admin("GET", WEIGHTS_ROUTE)
    assert status == 500 and "internal error" in answer["error"]


def test_the_store_goes_when_the_server_stops(server):
    store = server.swap.store
    assert store.is_dir()
    server.app.state.memit_swap = server.swap = None
    gc.collect()
    assert not store.exists()


def test_a_state_dir_carries_the_stack_over_a_restart(tmp_path, model, patch_dir, patches, monkeypatch):
    state = tmp_path / "state"
    first = make_server(tmp_path, model, patch_dir, monkeypatch, startup=patches[:1], **{STATE_DIR_ENV: str(state)})
    assert first.admin("POST", PATCHES_ROUTE, {"path": "p2.patch"})[0] == 200
    patch_dir.joinpath("p2.patch").unlink()  # the operator's file is not needed any more
    recorded = read_state(state)
    assert [p.patch_id for p in recorded] == first.stack()
    again = make_server(tmp_path, model, patch_dir, monkeypatch, startup=[p.path for p in recorded],
                        **{STATE_DIR_ENV: str(state)})
    assert again.stack() == first.stack()
    assert again.admin("DELETE", f"{PATCHES_ROUTE}/{first.stack()[1]}")[0] == 200
    assert [p.patch_id for p in read_state(state)] == again.stack()

    kept = read_state(state)[0].path
    edit_header(kept, lambda h: h["__metadata__"].update(name="changed"))
    with pytest.raises(MemitError, match="gone or changed"):
        read_state(state)
    kept.unlink()
    with pytest.raises(MemitError, match="gone or changed"):
        read_state(state)
