"""Start a real vLLM OpenAI-compatible server as a subprocess on 127.0.0.1, and always stop it.

The settings are those of the project's CPU tests: fp32, a 1 GiB KV cache, eager mode (no compile).
"""

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

    def greedy(self, prompts: list[str], n: int, model: str | None = None) -> list[list[int]]:
        """The token ids of each prompt's greedy completion of `n` tokens (of `model`, default the server's)."""
        out = self.post("/v1/completions", {"model": model or self.model, "prompt": prompts, "max_tokens": n,
                                            "temperature": 0, "return_token_ids": True})
        return [c["token_ids"] for c in sorted(out["choices"], key=lambda c: c["index"])]


def hf_greedy(model_dir, prompts: list[str], n: int) -> list[list[int]]:
    """The same as Server.greedy, from transformers in fp32: what a served model must reproduce."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


@contextmanager
def vllm_server(cmd: list[str], model: str, log: Path, timeout: float = 600, env: dict | None = None):
    """Run `cmd` (a server command line without --host/--port) and yield a Server once /health is up.
    The server runs in its own session (so it can be stopped as a group); a SIGTERM to this process
    becomes SystemExit while it runs, so the server is stopped then too, not orphaned."""
    port = free_port()
    full_env = {**os.environ, **VLLM_ENV, **(env or {})}
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], stdout=logf,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    previous = _exit_on_sigterm()
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM server not up after {timeout}s:\n{_tail(log)}") from e
                time.sleep(1)
        yield Server(f"http://127.0.0.1:{port}", model, proc, log)
    finally:
        stop(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """Make SIGTERM raise SystemExit (finally blocks run); the previous handler, or None off the main thread."""
    def exit_(signum, frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, exit_)
    except ValueError:  # not the main thread: leave signals alone
        return None


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
    """vLLM's own server, without memit-vllm's command (the plugin still loads: it is installed)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *BASE_ARGS, *extra]


def memit_serve_cmd(model: str | Path, *patches: str | Path) -> list[str]:
    """`memit-vllm serve MODEL --memit-patch P ...` with the test server flags."""
    flags = [a for p in patches for a in ("--memit-patch", str(p))]
    return [sys.executable, "-m", "memit_vllm", "serve", str(model), *flags, *BASE_ARGS]


def _tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
