"""What people do with patch files besides serving them: inspect, verify, apply, stack, diff.

Every function returns plain data (dicts of JSON types) or a Patch, so the CLI only formats it.
Numerics: norms, ranks and sums in float64 over the fp32 deltas; merged weights via PatchSet.merge,
the same routine the vLLM loader uses, so an applied checkpoint equals what the server merges.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..core.files import atomic_dir, check_new_dir
from ..core.records import fact_key, fact_text
from ..default_models import MANIFEST
from ..errors import MemitError
from .format import Patch, load_patch
from .merge import PatchSet

# Weight formats other than safetensors: `apply` leaves them out, or a loader could pick up unedited weights.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
APPLIED_FILE = "memit-vllm-applied.json"
_COPY_CHUNK = 64 << 20


# -- inspect ----------------------------------------------------------------------------------------
def _matrix(delta: torch.Tensor) -> torch.Tensor:
    d = delta.to(torch.float64)
    return d.reshape(1, -1) if d.ndim < 2 else d.reshape(d.shape[0], -1)


def numerical_rank(delta: torch.Tensor) -> tuple[int, float]:
    """Rank of a delta and the tolerance used: singular values above sigma_max * max(m, n) * eps(fp32).

    The LAPACK/numpy convention, with the machine epsilon of float32 because deltas are stored in fp32:
    anything below that is rounding noise of the stored values. SVD in float64.
    """
    m = _matrix(delta)
    s = torch.linalg.svdvals(m)
    if s.numel() == 0 or s[0] == 0:
        return 0, 0.0
    tol = float(s[0]) * max(m.shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum()), tol


def inspect_patch(path: str | os.PathLike) -> dict:
    """Everything a reviewer wants to know about a patch file, after checking its content hash."""
    patch = load_patch(path, verify_content=True)
    layers = []
    for name in patch.layers:
        d = patch.deltas[name]
        rank, tol = numerical_rank(d)
        layers.append({"name": name, "shape": list(d.shape), "norm": float(_matrix(d).norm()),
                       "rank": rank, "rank_tol": tol})
    return {
        "path": str(patch.path), "file_size": patch.path.stat().st_size, "patch_id": patch.patch_id,
        "format_version": patch.format_version, "name": patch.name, "version": patch.version,
        "created": patch.created, "tool_version": patch.tool_version, "parents": patch.parents,
        "made_on": patch.made_on,
        "base": patch.base.to_dict(), "hparams": patch.hparams, "covariance": patch.covariance,
        "stats": patch.stats, "n_facts": len(patch.requests), "facts": patch.requests, "layers": layers,
    }


# -- verify -----------------------------------------------------------------------------------------
def verify_patch(paths, model: str | os.PathLike, dtype: str | None = None) -> dict:
    """Check a patch, or a stack of patches in serving order (a patch made on a stack is checked with that
    stack before it), against a model with the one validation every entry point runs (PatchSet): content
    hash, finiteness, the architecture's down-projections only, the lineage, and for every tensor the base
    fingerprint, shape, dtype and a merged weight finite in `dtype` (default: the checkpoint's). Raises
    the specific PatchError on the first failure; returns what was checked (`patch`, `patch_id`: the last)."""
    patches = [load_patch(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    ckpt = Checkpoint(model)
    checked = PatchSet(patches, dtype=getattr(torch, dtype) if dtype else None).validate(ckpt)
    fingerprints = {n: f for p in patches for n, f in p.base_weights.items()}
    tensors = [{"name": name, "shape": list(base.shape), "weight_dtype": str(base.dtype).removeprefix("torch."),
                "base_sha256": fingerprints[name]} for name, base in checked.items()]
    last = patches[-1]
    return {
        "patch": str(last.path), "patch_id": last.patch_id, "stack": [p.patch_id for p in patches],
        "model": str(ckpt.path), "architecture": ckpt.architecture,
        "config_matches": all(p.base.config_sha256 == ckpt.config_sha256 for p in patches), "tensors": tensors,
    }


# -- apply ------------------------------------------------------------------------------------------
def _safetensors_layout(path: Path) -> tuple[int, dict]:
    """(data start offset, header) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _write_merged_shard(src: Path, dst: Path, patches: PatchSet) -> None:
    """Copy a safetensors shard byte for byte, replacing only the patched tensors by W + delta.

    Merging keeps every shape and dtype, so the source header (offsets included) stays valid as is.
    One tensor in memory at a time.
    """
    from safetensors import safe_open

    start, header = _safetensors_layout(src)
    entries = sorted((info["data_offsets"], name) for name, info in header.items() if name != "__metadata__")
    with open(src, "rb") as fin, open(dst, "wb") as fout, safe_open(src, "pt") as st:
        fout.write(fin.read(start))
        for (begin, stop), name in entries:
            if patches.touches(name):
                merged = patches.merge(name, st.get_tensor(name)).contiguous()
                fout.write(merged.reshape(-1).view(torch.uint8).numpy().tobytes())
                continue
            fin.seek(start + begin)
            left = stop - begin
            while left:
                block = fin.read(min(left, _COPY_CHUNK))
                fout.write(block)
                left -= len(block)


def apply_patches(patches: Sequence[Patch], model: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a standalone HF checkpoint with the patches merged (in order) into `out`.

    Everything is checked before a byte is written, and written into a temp dir beside `out` that is
    renamed at the end: a failure leaves no `out`. Other files of the model (config, tokenizer, ...)
    are copied; other weight formats and the prepared-model manifest are not (they describe the
    unedited weights).
    """
    ckpt = Checkpoint(model)
    ps = PatchSet(patches)
    ps.validate(ckpt)
    out = check_new_dir(out, "apply")
    try:
        _write_checkpoint(ckpt, ps, out)
    except OSError as e:  # unwritable place, full disk: atomic_dir leaves nothing behind
        raise MemitError(f"cannot write the merged checkpoint to {out}: {e.strerror or e}") from e
    return out


def _write_checkpoint(ckpt: Checkpoint, ps: PatchSet, out: Path) -> None:
    weights = set(ckpt.weight_files())
    with atomic_dir(out) as tmp:
        for src in sorted(ckpt.path.rglob("*")):
            rel = src.relative_to(ckpt.path)
            if src.is_dir() or rel.parts[0].startswith(".") or rel.name == MANIFEST:
                continue
            if src.suffix in _OTHER_WEIGHTS or (src.suffix == ".safetensors" and src not in weights):
                continue
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src in weights:
                _write_merged_shard(src, dst, ps)
            else:
                shutil.copyfile(src, dst)
        applied = {"base": str(ckpt.path), "patches": [
            {"patch_id": p.patch_id, "name": p.name, "version": p.version, "path": str(p.path or "")}
            for p in ps.patches]}
        (tmp / APPLIED_FILE).write_text(json.dumps(applied, indent=2) + "\n")


# -- stack ------------------------------------------------------------------------------------------
def _shared(values: list, ids: list[str]):
    """One value if every patch has the same, else each patch's value keyed by its id."""
    return values[0] if all(v == values[0] for v in values) else {"by_parent": dict(zip(ids, values))}


def stack_patches(patches: Sequence[Patch], name: str = "", version: str = "") -> Patch:
    """One patch equal to applying `patches` in order: deltas summed (float64, stored fp32), facts
    concatenated, the stacked ids as parents, and the first one's `made_on` (a whole lineage stacks
    into a patch made on the bare base). All must share the base and form a valid stack (PatchSet)."""
    ps = PatchSet(patches)
    ps.check_model(ps.patches[0].base.architecture)
    ids = [p.patch_id for p in ps.patches]
    deltas, base_weights = {}, {}
    for n in ps.names:
        owners = [p for p in ps.patches if n in p.deltas]
        summed = sum(p.deltas[n].to(torch.float64) for p in owners)
        ps.check_finite(n, summed, torch.float32)  # what the file stores
        deltas[n] = summed.to(torch.float32)
        base_weights[n] = owners[0].base_weights[n]
    return Patch(
        deltas=deltas, base=ps.patches[0].base, base_weights=base_weights,
        requests=[r for p in ps.patches for r in p.requests],
        hparams=_shared([p.hparams for p in ps.patches], ids),
        covariance=_shared([p.covariance for p in ps.patches], ids),
        stats=_shared([p.stats for p in ps.patches], ids),
        name=name or "+".join(p.name or p.patch_id for p in ps.patches), version=version, parents=ids,
        made_on=list(ps.patches[0].made_on),
    )


# -- diff -------------------------------------------------------------------------------------------
def diff_patches(a: Patch, b: Patch) -> dict:
    """Facts added/removed/changed from a to b, and per-tensor Frobenius norms of b - a."""
    fa = {fact_key(r): r for r in a.requests}
    fb = {fact_key(r): r for r in b.requests}
    changed = [{"fact": k, "a": fact_text(fa[k]), "b": fact_text(fb[k])}
               for k in fa.keys() & fb.keys() if fa[k] != fb[k]]
    tensors = []
    for n in sorted(set(a.deltas) | set(b.deltas)):
        da = _matrix(a.deltas[n]) if n in a.deltas else None
        db = _matrix(b.deltas[n]) if n in b.deltas else None
        row = {"name": n, "in": "both" if da is not None and db is not None else ("a" if db is None else "b"),
               "norm_a": float(da.norm()) if da is not None else None,
               "norm_b": float(db.norm()) if db is not None else None}
        same_shape = row["in"] == "both" and da.shape == db.shape
        row["diff_norm"] = float((db - da).norm()) if same_shape else None
        row["rel_diff"] = row["diff_norm"] / row["norm_a"] if same_shape and row["norm_a"] else None
        tensors.append(row)
    return {
        "a": {"path": str(a.path or ""), "patch_id": a.patch_id, "name": a.name, "version": a.version,
              "made_on": a.made_on},
        "b": {"path": str(b.path or ""), "patch_id": b.patch_id, "name": b.name, "version": b.version,
              "made_on": b.made_on},
        "same_base": (a.base.architecture, a.base.config_sha256) == (b.base.architecture, b.base.config_sha256) and all(
            a.base_weights[n] == b.base_weights[n] for n in a.base_weights.keys() & b.base_weights.keys()),
        "facts_added": [fact_text(fb[k]) for k in sorted(fb.keys() - fa.keys())],
        "facts_removed": [fact_text(fa[k]) for k in sorted(fa.keys() - fb.keys())],
        "facts_changed": sorted(changed, key=lambda c: c["fact"]),
        "tensors": tensors,
    }
