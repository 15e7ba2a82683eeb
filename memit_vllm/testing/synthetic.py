"""Synthetic but real patches for the patch tests, the serving tests and the benchmarks.

A synthetic patch holds random rank-k deltas on the MLP down-projection weights of a checkpoint,
bound to that checkpoint by real fingerprints: everything but the MEMIT math of a real patch.
`mutate` breaks a valid patch file in the ways files break (truncation, flipped bytes, edited
header JSON, wrong shapes/dtypes) for the property-based test and bench/fuzz_patches.py.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..core.architectures import by_class
from ..patch import BaseModel, Patch, load_patch


def down_proj_names(ckpt: Checkpoint, layers) -> list[str]:
    """The checkpoint keys of the down-projections of `layers` (from the architecture table)."""
    arch = by_class(ckpt.architecture)
    return [n for n in ckpt.keys() if arch.layer_of(n) in layers]


def facts(tag: str, n: int) -> list[dict]:
    return [{"prompt": "{} is located in", "subject": f"{tag} place {i}", "target_new": {"str": f"City{i}"},
             "target_true": {"str": "Paris"}} for i in range(n)]


def synthetic_patch(model_dir, layers=(1, 2), rank: int = 2, seed: int = 0, scale: float = 0.05,
                    requests: list[dict] | None = None, name: str = "synthetic") -> Patch:
    """Random rank-`rank` fp32 deltas (Frobenius norm `scale`) on the down-projections of `layers`."""
    ckpt = Checkpoint(model_dir)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for n in down_proj_names(ckpt, layers):
        rows, cols = ckpt.tensor(n).shape
        d = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, cols, generator=g,
                                                                                     dtype=torch.float64)
        deltas[n] = (d * scale / d.norm()).float()
    return Patch(deltas=deltas, base=BaseModel(str(ckpt.path), ckpt.architecture, ckpt.config_sha256),
                 base_weights={n: ckpt.fingerprint(n) for n in deltas},
                 requests=facts(f"s{seed}", rank) if requests is None else requests,
                 hparams={"layers": list(layers), "mom2_update_weight": 15000},
                 covariance={"corpus": "synthetic", "tokens": 0}, name=name, version="1")


# -- raw header surgery ---------------------------------------------------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def edit_header(path: Path, fn) -> None:
    """Rewrite a patch file's header JSON in place with `fn(header)` (tensor bytes untouched)."""
    header, body = split(path.read_bytes())
    fn(header)
    path.write_bytes(join(header, body))


# -- mutations ------------------------------------------------------------------------------------
_JUNK = ["", "null", "[]", "{}", "99", "-1", "1e400", "\"x\"", "{\"a\":", "NaN", "[[[[[]]]]]", "\u00e9\u0000",
         '{"name_or_path": 1, "architecture": [], "config_sha256": null}', '{"x": "y"}', '[{"prompt": 1}]']
_DTYPES = ["F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F32", "F8_E4M3", "X", 3, None]


def _random_value(rnd: random.Random):
    return rnd.choice([rnd.choice(_JUNK), rnd.randint(-2, 2**40), None, [], {}, [1, "a"], "F32", 1.5,
                       "".join(chr(rnd.randrange(32, 0x2FFF)) for _ in range(rnd.randrange(8)))])


def _shape(rnd: random.Random, shape: list):
    return rnd.choice([shape[::-1], [shape[0] * 2, shape[1] // 2], [rnd.randint(-3, 300) for _ in shape],
                       shape + [1], shape[:1], [], "64", [str(s) for s in shape], [1.0 * s for s in shape]])


def _edit_header(header: dict, rnd: random.Random) -> dict | list | str:
    meta = header.setdefault("__metadata__", {})
    names = [k for k in header if k != "__metadata__"]
    name = rnd.choice(names)
    kind = rnd.randrange(11)
    if kind == 0 and meta:
        del meta[rnd.choice(sorted(meta))]
    elif kind == 1:
        meta[rnd.choice(sorted(meta) + ["extra"])] = rnd.choice(_JUNK)
    elif kind == 2:
        meta["format_version"] = rnd.choice(["0", "2", "99", "-1", "one", "1.0", " 1", "", "1" * 5000])
    elif kind == 3:
        meta[rnd.choice(sorted(meta))] = _random_value(rnd)
    elif kind == 4:
        header[name]["dtype"] = rnd.choice(_DTYPES)
    elif kind == 5:
        header[name]["shape"] = _shape(rnd, header[name]["shape"])
    elif kind == 6:
        begin, stop = header[name]["data_offsets"]
        header[name]["data_offsets"] = rnd.choice([[stop, begin], [begin + 4, stop + 4], [0, stop - begin],
                                                   [begin], [begin, stop, 0], [-4, stop], "0-8"])
    elif kind == 7:
        del header[name]
    elif kind == 8:
        header[rnd.choice(["extra.weight", name + "x"])] = dict(header[name])
    elif kind == 9:
        header["__metadata__"] = _random_value(rnd)
    else:
        header[name] = _random_value(rnd)
    return header if rnd.random() < 0.95 else rnd.choice([[header], "header", 7])


def _resave_inconsistent(data: bytes, path: Path, rnd: random.Random) -> bytes:
    """A well-formed patch with a consistent id whose content is wrong for its base: a delta in the
    wrong shape or layout, a wrong fingerprint, or a delta for a weight the base does not have."""
    path.write_bytes(data)
    p = load_patch(path)
    deltas = {n: p.deltas[n] for n in p.deltas}
    base_weights = dict(p.base_weights)
    name = rnd.choice(sorted(deltas))
    kind = rnd.randrange(4)
    if kind == 0:
        deltas[name] = deltas[name].T.contiguous()
    elif kind == 1:
        deltas[name] = deltas[name].reshape(-1)[: rnd.randrange(1, deltas[name].numel())].clone()
    elif kind == 2:
        base_weights[name] = rnd.choice(["0" * 64, base_weights[name][::-1], ""])
    else:
        deltas["model.layers.999.mlp.down_proj.weight"] = deltas[name]
        base_weights["model.layers.999.mlp.down_proj.weight"] = base_weights[name]
    Patch(deltas=deltas, base=p.base, base_weights=base_weights, requests=p.requests, hparams=p.hparams,
          covariance=p.covariance, stats=p.stats, name=p.name, version=p.version, created=p.created).save(path)
    return path.read_bytes()


def _set_float(data: bytes, rnd: random.Random) -> bytes:
    """Overwrite one delta value with NaN/Inf (or another odd float) in place."""
    body = split(data)[1]
    start = len(data) - len(body)
    i = start + 4 * rnd.randrange(len(body) // 4)
    value = rnd.choice([float("nan"), float("inf"), -float("inf"), 1e38, -0.0, 1e-45])
    return data[:i] + struct.pack("<f", value) + data[i + 4:]


MUTATIONS = ("truncate", "flip", "header", "inconsistent", "nonfinite", "append")


def mutate(data: bytes, kind: str, rnd: random.Random, scratch: Path) -> bytes:
    """One broken variant of a valid patch file's bytes. `scratch` is a file path the resaver may use."""
    if kind == "truncate":
        return data[:rnd.randrange(len(data))]
    if kind == "flip":
        out = bytearray(data)
        header_end = 8 + struct.unpack("<Q", data[:8])[0]
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(header_end) if rnd.random() < 0.6 else rnd.randrange(len(out))
            out[i] ^= rnd.randrange(1, 256)
        return bytes(out)
    if kind == "header":
        header, body = split(data)
        return join(_edit_header(header, rnd), body)
    if kind == "inconsistent":
        return _resave_inconsistent(data, scratch, rnd)
    if kind == "nonfinite":
        return _set_float(data, rnd)
    return data + bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
