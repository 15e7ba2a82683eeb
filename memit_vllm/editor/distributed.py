"""torch.distributed for make-patch and `stats compute`: the costs that grow with a job are sums over
independent work (corpus batches, edits), so ranks split the work and combine the results.

Under torchrun (`init_from_env`: gloo on CPUs, NCCL for CUDA tensors), or in a program that initialised
a process group itself:
- corpus batches: each rank takes every world-th batch of its shard (`covariance.Shard.within`) and the
  float64 sums are added in rank order (`sum_in_rank_order`): the same bits for a given world size, and
  one process's sums up to float64 rounding for any other;
- edits: each rank optimises z for, and reads the keys of, a contiguous share of the edits (`share`);
  the results are gathered in edit order on every rank, so every rank applies the same layer updates;
- rank 0 shows progress and writes files (`is_main`).
Outside a process group (or with one process) every function here is the identity.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import MemitError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1). With a GPU per process on the node,
    each rank takes the GPU of its LOCAL_RANK and CUDA tensors go through NCCL; the rest through gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available() and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= torch.cuda.device_count():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)


def check_shares(n: int, what: str) -> None:
    """Every rank needs a share: fail before any heavy work when there are fewer items than ranks."""
    if n < world():
        raise MemitError(f"{n} {what} on {world()} processes: each process needs at least one; run at most {n} "
                         "processes (torchrun --nproc-per-node)")


def share(n: int) -> slice:
    """This rank's contiguous share of n items (the first n % world ranks take one more)."""
    base, extra = divmod(n, world())
    start = rank() * base + min(rank(), extra)
    return slice(start, start + base + (rank() < extra))


def sum_in_rank_order(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t`, added in rank order on rank 0 ((t0 + t1) + t2 ...) and sent to every
    rank: an all-reduce adds in an order that depends on its algorithm."""
    if not active():
        return t
    if is_main():
        total, part = t.clone(), torch.empty_like(t)
        for r in range(1, world()):
            dist.recv(part, src=r)
            total += part
    else:
        dist.send(t.contiguous(), dst=0)
        total = torch.empty_like(t)
    dist.broadcast(total, src=0)
    return total


def sum_over_ranks(sums: dict[int, torch.Tensor], count: int) -> tuple[dict[int, torch.Tensor], int]:
    """Per-layer sums and the token count, each summed over the ranks in rank order."""
    if not active():
        return sums, count
    total = sum_in_rank_order(torch.tensor([float(count)], dtype=torch.float64))
    return {l: sum_in_rank_order(s) for l, s in sorted(sums.items())}, int(total.item())


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over the ranks (a layer one rank lacks in its cache is computed by all)."""
    if not active():
        return flags
    t = torch.tensor(flags, dtype=torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the first dimension may differ), concatenated in rank order, on every rank."""
    if not active():
        return t
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]]))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])


def split_edits(compute: Callable, requests: list):
    """`compute` on this rank's share of the requests; its result (a dataclass of tensors with one row
    per request) gathered for all the requests, in request order."""
    if not active():
        return compute(requests)
    result = compute(requests[share(len(requests))])
    return type(result)(**{f.name: gather(getattr(result, f.name)) for f in fields(result)})


class SplitReader:
    """A key reader (memit.KeyReader) over this rank's share of the edits whose reads return the rows of
    every edit, in request order."""

    def __init__(self, make: Callable, requests: list):
        self.reader = make(requests[share(len(requests))])

    def read(self, layer: int, out_layer: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys, outs = self.reader.read(layer, out_layer)
        return gather(keys), None if outs is None else gather(outs)
