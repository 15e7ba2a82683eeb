"""`stats import`: the covariance statistics the reference implementations publish (ROME/MEMIT
`layer_stats`, as released for EasyEdit and AlphaEdit), as a stats file for this checkpoint.

Layout: `{stats_dir}/{model}/{ds}_stats/{layer}_{precision}_{stats}[_{samples}].npz`, where `layer` is
the down-projection's module name (`model.layers.4.mlp.down_proj`), `stats` the collected statistics
joined by '-' (must include mom2) and the file a runningstats CombinedStat state dict: `mom2.mom2` is the
sum of k k^T in `precision`, `mom2.count` the number of tokens. Each file is read once (its sha256 and its
arrays from the same bytes), without pickle; each array's shape and dtype are checked against the
checkpoint from its .npy header before its data is parsed.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..core.architectures import Architecture
from ..errors import MemitError
from .covariance import stats_identity
from .stats_file import StatsFile

NUMPY_DTYPES = ("float32", "float64")  # what the reference's .npz files hold (numpy has no bfloat16)
_NAME = re.compile(r"^(?P<precision>float\d+)_(?P<stats>.+?)(?:_t(?:\d+|\{batch_tokens\}))?(?:_(?P<samples>\d+))?$")


def _candidates(source: Path, module: str, precision: str | None, samples: int | None) -> list[tuple[Path, dict]]:
    """Reference files for one layer under `source`, with what their names say."""
    found = []
    for f in sorted(source.rglob("*.npz")):
        if not f.name.startswith(module + "_"):
            continue
        m = _NAME.match(f.name[len(module) + 1 : -len(".npz")])
        if not m or "mom2" not in m["stats"].split("-"):
            continue
        info = {"precision": m["precision"], "samples": int(m["samples"]) if m["samples"] else None}
        if (precision is None or info["precision"] == precision) and (samples is None or info["samples"] == samples):
            found.append((f, info))
    return found


def _npy_header(z: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with z.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _read_layer(f: Path, d_ff: int) -> tuple[torch.Tensor, int, str]:
    """(sum of k k^T as float64, token count, the file's sha256) of one reference file, read once and
    checked before and after its arrays are parsed."""
    def bad(what: str) -> MemitError:
        return MemitError(f"reference statistics {f.name}: {what}")

    limit = d_ff * d_ff * 8 + (1 << 20)  # a float64 d_ff x d_ff array and the archive's overhead
    if not f.is_file():
        raise bad("not a regular file")
    if f.stat().st_size > limit:
        raise bad(f"{f.stat().st_size} bytes, more than statistics of a {d_ff}-wide layer take ({limit}); "
                  "not a layer_stats file of this model")
    try:
        raw = f.read_bytes()  # bounded above: the whole file is read only when it can be what it claims
        sha256 = hashlib.sha256(raw).hexdigest()
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            names = set(z.namelist())
            if not {"mom2.mom2.npy", "mom2.count.npy"} <= names:
                raise bad("no mom2.mom2 and mom2.count arrays (not a ROME/MEMIT layer_stats file with mom2)")
            shape, dtype = _npy_header(z, "mom2.mom2.npy")
            if shape != (d_ff, d_ff):
                raise bad(f"mom2 is {list(shape)}, this checkpoint's down-projection input is {d_ff} wide: "
                          "statistics of another model")
            if dtype.name not in NUMPY_DTYPES:
                raise bad(f"mom2 is {dtype}; only {', '.join(NUMPY_DTYPES)} statistics are read")
            c_shape, c_dtype = _npy_header(z, "mom2.count.npy")
            if c_shape not in ((), (1,)) or c_dtype.kind not in "iuf":
                raise bad("mom2.count is not a single number")
        with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
            mom2, count = arrays["mom2.mom2"], float(arrays["mom2.count"].reshape(()))
        del raw  # freed before the float64 copy below: the peak stays mom2 and that copy
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as e:
        raise bad(f"cannot be read as an .npz ({type(e).__name__}); truncated or not numpy?") from e
    if not (count >= 1 and count == int(count)):
        raise bad("mom2.count is not a positive integer")
    total = torch.from_numpy(mom2).to(torch.float64)
    if not torch.isfinite(total).all():
        raise bad("mom2 holds NaN or Inf")
    return total, int(count), sha256


def import_reference(source: Path, arch: Architecture, layers: list[int], d_ff: int, model_sha: str,
                     precision: str | None = None, samples: int | None = None) -> StatsFile:
    """The reference files for `layers` found under `source` (a stats dir, or a `{ds}_stats` dir in it),
    as a stats file of this checkpoint (`model_sha`): one file per layer, of one directory, precision and
    sample size; provenance records each file's name and sha256."""
    if not source.is_dir():
        raise MemitError(f"--from {source}: not a directory (give the reference's stats dir or its {{ds}}_stats dir)")
    chosen = {}
    for layer in layers:
        module = arch.module_name(layer)
        found = _candidates(source, module, precision, samples)
        if not found:
            raise MemitError(f"no reference statistics for layer {layer} under {source}: expected "
                             f"{module}_<precision>_mom2[_<samples>].npz (e.g. {module}_float32_mom2_100000.npz)")
        if len(found) > 1:
            raise MemitError(f"several reference statistics for layer {layer} under {source} "
                             f"({', '.join(str(f.relative_to(source)) for f, _ in found)}): choose with --precision, "
                             "--samples, or a --from dir that holds one set")
        chosen[layer] = found[0]
    kinds = {(f.parent, info["precision"], info["samples"]) for f, info in chosen.values()}
    if len(kinds) > 1:
        raise MemitError(f"the reference statistics found for layers {layers} are of different directories, "
                         "precisions or sample sizes; choose one set with --from, --precision or --samples")
    (folder, dtype, n_samples), = kinds
    sums, counts, files = {}, {}, {}
    for layer, (f, _) in chosen.items():
        sums[layer], counts[layer], sha256 = _read_layer(f, d_ff)
        files[str(layer)] = {"name": f.name, "sha256": sha256, "count": counts[layer]}
    ds = folder.name.removesuffix("_stats")
    digest = hashlib.sha256("|".join(files[str(l)]["sha256"] for l in layers).encode()).hexdigest()
    provenance = {"imported": "reference layer_stats (ROME/MEMIT .npz)", "model": folder.parent.name, "dataset": ds,
                  "samples": n_samples, "precision": dtype, "files": files}
    description = (f"reference layer_stats {folder.parent.name}/{folder.name} ({n_samples or 'all'} samples of "
                   f"{ds}, {dtype})")
    return StatsFile(stats_identity(model_sha, f"reference:{ds}:{digest}", None, dtype, d_ff), counts,
                     description=description, provenance=provenance, sums=sums)
