"""How fast this machine multiplies in each forward dtype (the figure behind precision.runs_natively):
a matmul of the z loop's shape, [tokens, d_model] x [d_model, d_ff] (SmolLM2: 1024 x 576 x 1536), forward
and backward, median of --repeats, in float32, bfloat16 and float16, with what runs_natively says of each.

    OMP_NUM_THREADS=1 .venv/bin/python bench/matmul_dtypes.py [--shape 1024 576 1536] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memit_vllm.editor.hparams import FORWARD_DTYPES
from memit_vllm.editor.precision import runs_natively


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[1024, 576, 1536], metavar=("TOKENS", "D_MODEL", "D_FF"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, d, f = args.shape
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} thread(s)")
    print("| dtype | native (runs_natively) | forward (s) | backward (s) | forward vs float32 | backward vs float32 |\n"
          "|---|---|---|---|---|---|")
    base = None
    for name in FORWARD_DTYPES:
        dtype = getattr(torch, name)
        x = torch.randn(n, d, dtype=dtype, requires_grad=True)
        w = torch.randn(f, d, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            forward = timed(lambda x=x, w=w: x @ w.T, args.repeats)
        backward = timed(lambda x=x, w=w: (x @ w.T).sum().backward(), args.repeats) - forward
        base = base or (forward, backward)
        print(f"| {name} | {runs_natively(name, 'cpu')} | {forward:.4f} | {backward:.4f} | {forward / base[0]:.1f}x "
              f"| {backward / base[1]:.1f}x |")


if __name__ == "__main__":
    main()
