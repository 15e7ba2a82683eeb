"""What torch.distributed buys on this machine (issue 16 item 4): `torchrun --nproc-per-node 2` with one
thread each vs one process with two threads, for the statistics and for make-patch of N edits, and what
the collective steps cost (the terms of the wall-time formula for N machines, docs/benchmarks.md).

    .venv/bin/python bench/distributed.py [--model smollm2-135m] [--edits 100] [--tokens 200000] [--out DIR]

Each arm is a fresh `memit-vllm` process, as a user runs it:
- stats: `stats compute` of --tokens tokens of the project corpus;
- edits: `make-patch --stats` (the file of the one-process stats arm: only z, key reads and updates run)
  of --edits CounterFact edits; the per-step seconds come from its --json report;
- collectives (2 processes): `sum_in_rank_order` of one layer's d_ff x d_ff float64 sums and `gather` of
  --edits rows of d_model floats, the steps the statistics add per layer and z adds per run.
Prints a Markdown table and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "smollm2_self_2k.jsonl"
REQUESTS = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_500.json"
ARMS = {"1 process x 2 threads": (1, 2), "torchrun 2 processes x 1 thread": (2, 1)}


def launch(procs: int, threads: int, args: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of `args` (a module and its arguments) in `procs` processes of `threads` threads."""
    if procs == 1:
        cmd = [sys.executable, "-m", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(procs),
               "--master-addr", "127.0.0.1", "--master-port", "29591", "-m", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def report(stdout: str) -> dict:
    """The --json report rank 0 printed (the first JSON object on stdout)."""
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])[0]


def collectives(d_ff: int, d_model: int, rows: int, repeats: int = 5) -> None:
    """Under torchrun: time the collective steps; rank 0 prints them as JSON."""
    import torch

    from memit_vllm.editor import distributed

    distributed.init_from_env()
    sums = torch.randn(d_ff, d_ff, dtype=torch.float64)
    part = torch.randn(rows // distributed.world(), d_model)
    timings = {}
    for name, step in (("sum_in_rank_order", lambda: distributed.sum_in_rank_order(sums)),
                       ("gather", lambda: distributed.gather(part))):
        step()  # connections are set up on first use
        t = time.perf_counter()
        for _ in range(repeats):
            step()
        timings[name] = (time.perf_counter() - t) / repeats
    if distributed.is_main():
        print(json.dumps({"d_ff": d_ff, "d_model": d_model, "rows": rows, **timings}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--collectives", nargs=3, type=int, metavar=("D_FF", "D_MODEL", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.collectives:
        collectives(*args.collectives)
        return
    from memit_vllm.checkpoint import Checkpoint
    from memit_vllm.editor.arch import checkpoint_dims

    ckpt = Checkpoint(args.model)
    _, _, d_ff = checkpoint_dims(ckpt)
    d_model = ckpt.config.get("hidden_size") or ckpt.config.get("n_embd")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    out.mkdir(parents=True, exist_ok=True)
    cli = ["memit_vllm"]
    results = {"model": str(ckpt.path), "edits": args.edits, "tokens": args.tokens, "arms": {}}
    stats_file = out / "stats-1.st"
    for arm, (procs, threads) in ARMS.items():
        stats_s, _ = launch(procs, threads, [*cli, "stats", "compute", "--model", str(ckpt.path), "--corpus",
                                             str(CORPUS), "--tokens", str(args.tokens), "--out",
                                             str(out / f"stats-{procs}.st"), "--json"])
        patch_s, stdout = launch(procs, threads, [*cli, "make-patch", "--model", str(ckpt.path), "--requests",
                                                  str(REQUESTS), "--limit", str(args.edits), "--stats",
                                                  str(stats_file), "--out", str(out / f"edits-{procs}.patch"),
                                                  "--json"])
        steps = report(stdout)["seconds"]
        results["arms"][arm] = {"stats_wall_s": stats_s, "make_patch_wall_s": patch_s,
                                **{f"{k}_s": v for k, v in steps.items()}}
    _, stdout = launch(2, 1, ["bench.distributed", "--collectives", str(d_ff), str(d_model), str(args.edits)])
    results["collectives"] = report(stdout)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"| arm ({args.edits} edits, {args.tokens} tokens) | stats wall s | make-patch wall s | z s | update s |")
    print("|---|---|---|---|---|")
    for arm, r in results["arms"].items():
        print(f"| {arm} | {r['stats_wall_s']:.1f} | {r['make_patch_wall_s']:.1f} | {r['z_s']:.1f} | "
              f"{r['update_s']:.1f} |")
    c = results["collectives"]
    print(f"\ncollectives, 2 processes: sum_in_rank_order of {d_ff}x{d_ff} float64 {c['sum_in_rank_order']:.3f} s; "
          f"gather of {args.edits}x{d_model} {c['gather'] * 1000:.2f} ms; results in {out}")


if __name__ == "__main__":
    main()
