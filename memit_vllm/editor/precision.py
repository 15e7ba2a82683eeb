"""Running a model's forward in another floating dtype for a while, exactly restored afterwards.

The z optimisation may run the layers above L in bfloat16 (`HParams.z_dtype`): on CPUs with AVX-512
BF16/AMX and on GPUs its matmuls run at 2-4x the fp32 rate; on a CPU without them (AVX2 only) torch
takes a reference path, 9x (forward) to 32x (backward) slower than fp32 (`runs_natively`;
bench/matmul_dtypes.py). Casting a parameter is lossy, so the
original tensors are kept and put back bit for bit; buffers (rotary frequencies) keep their dtype,
since the models upcast them where they need precision. While the block runs, the parameters that
change dtype exist twice (the original and the cast); a model already in `dtype` is not copied. A
parameter a device map offloaded (a meta tensor, loaded before each forward in the dtype the module's
parameter has: editor/offload.py) is not copied: its meta stand-in takes `dtype` for the block.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def computing_in(model: torch.nn.Module, dtype: torch.dtype):
    """Within the block, every floating parameter of `model` is a `dtype` copy; afterwards the originals."""
    changes = lambda p: p is not None and p.is_floating_point() and p.dtype != dtype  # noqa: E731
    saved = [(p, p.data) for p in model.parameters() if changes(p) and p.device.type != "meta"]
    # an offloaded module's forward replaces its parameter objects: restored by name, not through .data
    offloaded = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()
                 if changes(p) and p.device.type == "meta"]
    for p, data in saved:
        p.data = data.to(dtype)
    for m, name, p in offloaded:
        m._parameters[name] = torch.nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=False)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data
        for m, name, p in offloaded:
            m._parameters[name] = p


def forward_dtype(name: str | None, model: torch.nn.Module) -> torch.dtype:
    """The dtype an hparams forward option names (z_dtype, mom2_model_dtype, keys_dtype), else the model's own."""
    return getattr(torch, name) if name else model.dtype


def runs_natively(name: str | None, device_type: str) -> bool:
    """Whether matmuls in the dtype `name` (FORWARD_DTYPES; None: the model's, taken as native) run in
    hardware on `device_type`: half precision on a CPU needs oneDNN's support (AVX-512 BF16/FP16, AMX),
    bfloat16 on CUDA a GPU that has it."""
    if name in (None, "float32", "float64"):
        return True
    if device_type == "cuda":
        return name != "bfloat16" or torch.cuda.is_bf16_supported()
    supported = {"bfloat16": torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 "float16": torch.ops.mkldnn._is_mkldnn_fp16_supported}[name]
    return device_type == "cpu" and supported()
