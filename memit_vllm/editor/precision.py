"""Running a model's forward in another floating dtype for a while, exactly restored afterwards.

The z optimisation may run the layers above L in bfloat16 (`HParams.z_dtype`): on CPUs with AVX-512
BF16/AMX and on GPUs its matmuls run at 2-4x the fp32 rate. Casting a parameter is lossy, so the
original tensors are kept and put back bit for bit; buffers (rotary frequencies) keep their dtype,
since the models upcast them where they need precision. While the block runs, the parameters that
change dtype exist twice (the original and the cast); a model already in `dtype` is not copied.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def computing_in(model: torch.nn.Module, dtype: torch.dtype):
    """Within the block, every floating parameter of `model` is a `dtype` copy; afterwards the originals."""
    saved = [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    for p, data in saved:
        p.data = data.to(dtype)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data
