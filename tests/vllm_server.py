"""Start a real vLLM OpenAI-compatible server as a subprocess on 127.0.0.1, and always stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BASE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, model: str, proc: subprocess.Popen, log: Path):
        self.url, self.model, self.proc, self.log = url, model, proc, log

    def post(self, route: str, body: dict, timeout: float = 120) -> dict:
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def get(self, route: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def complete(self, prompts: list[str], max_tokens: int = 4, **kw) -> list[str]:
        out = self.post("/v1/completions", {"model": self.model, "prompt": prompts, "max_tokens": max_tokens,
                                            "temperature": 0, **kw})
        return [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]


@contextmanager
def vllm_server(cmd: list[str], model: str, log: Path, timeout: float = 600, env: dict | None = None):
    """Run `cmd` (a server command line without --host/--port) and yield a Server once /health is up."""
    port = free_port()
    full_env = {**os.environ, **VLLM_ENV, **(env or {})}
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=logf,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM server not up after {timeout}s:\n{_tail(log)}")
                time.sleep(1)
        yield Server(f"http://127.0.0.1:{port}", model, proc, log)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (API server, engine core, workers), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def api_server_cmd(model: str | Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *BASE_ARGS, *extra]


def _tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
