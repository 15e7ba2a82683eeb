"""Peak memory of an edit, for make-patch's report: what a run on a larger model will need.

The process's peak resident set (the model, the covariance and the kept key states are the large
parts) beside the size of the checkpoint's weights, and where CUDA is in use, each GPU's peak
allocation since the edit began.
"""

from __future__ import annotations

import resource
import sys

import torch

from ..checkpoint import Checkpoint

GB = 1024**3


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_gpu_peaks() -> None:
    if _cuda_in_use():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peak_memory(ckpt: Checkpoint) -> dict:
    """peak_rss_gb (of this process so far), checkpoint_gb (its weight files), gpu_peak_gb per CUDA device."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes
    out = {"peak_rss_gb": round(rss / GB, 3),
           "checkpoint_gb": round(sum(f.stat().st_size for f in ckpt.weight_files()) / GB, 3)}
    if _cuda_in_use():
        out["gpu_peak_gb"] = {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / GB, 3)
                              for i in range(torch.cuda.device_count())}
    return out
