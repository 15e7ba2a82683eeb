"""The main job: teach the default model new facts, serve the patch, ask through the OpenAI API.

    .venv/bin/python examples/main_job.py [--facts examples/facts.json] [--out facts.patch]

1. `memit-vllm make-patch` on SmolLM2-135M-Instruct with the facts (covariance from the shared corpus);
2. vLLM's OpenAI server on the base model, then `memit-vllm serve --memit-patch` on the same model;
3. the same questions to both at temperature 0 (the edited prompts and untouched ones): before/after.
Ports are free ones on 127.0.0.1; each server is stopped before the next starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

from memit_vllm.core.contract import SERVER_MODULE

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "smollm2_self_2k.jsonl"
UNTOUCHED = ["The capital of France is", "The Eiffel Tower is located in", "Barack Obama was born in"]
CPU_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]


def ask(cmd: list[str], model: str, questions: list[str]) -> list[str]:
    """Start a server with `cmd`, ask each question (greedy, 8 tokens), stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    proc = subprocess.Popen([*cmd, *CPU_FLAGS, "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                client.models.list()
                break
            except Exception:  # not up yet
                time.sleep(2)
        out = client.completions.create(model=model, prompt=questions, max_tokens=8, temperature=0)
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=Path, default=ROOT / "examples" / "facts.json")
    ap.add_argument("--out", type=Path, default=Path("facts.patch"))
    args = ap.parse_args()
    cli = [sys.executable, "-m", "memit_vllm"]
    model = subprocess.run([*cli, "model", "prepare", "smollm2-135m"], check=True, capture_output=True,
                           text=True).stdout.splitlines()[-1]
    subprocess.run([*cli, "make-patch", "--model", model, "--requests", str(args.facts), "--out", str(args.out),
                    "--stats-corpus", str(CORPUS), "--name", "main-job", "--version", "1"], check=True)

    facts = json.loads(args.facts.read_text())
    edited = [f["prompt"].format(f["subject"]) for f in facts]
    questions = edited + UNTOUCHED
    before = ask([sys.executable, "-m", SERVER_MODULE, "--model", model], model, questions)
    after = ask([*cli, "serve", model, "--memit-patch", str(args.out)], model, questions)
    wanted = [f["target_new"] for f in facts] + [None] * len(UNTOUCHED)
    for q, b, a, want in zip(questions, before, after, wanted):
        label = f"edited -> {want}" if want else "untouched"
        print(f"{q!r} ({label})\n    before: {b!r}\n    after:  {a!r}")


if __name__ == "__main__":
    main()
