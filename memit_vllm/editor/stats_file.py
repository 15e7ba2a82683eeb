"""Covariance statistics as a file, so a corpus pass can run anywhere (N machines or a scheduler's jobs,
each a shard; torch.distributed; another toolkit: stats_import.py) and make-patch reads the result.

A safetensors file of sums, not means (shards add): `layer{l}.mom2_sum` [d_ff, d_ff] F64 (the sum of
k k^T over the corpus tokens) and `layer{l}.count` [1] F64 (the tokens) per layer; string metadata:
format, format_version, the identity (covariance.stats_identity: model weights sha256, corpus, token
budget, dtype, d_ff, and `forward` when the model ran in a reduced precision), layers (JSON list),
shards (JSON {"of": N, "parts": [...]}: the parts of the pass it holds), description, provenance (JSON:
where imported sums came from).
Files are untrusted input: the header is size-bounded and checked (names, dtypes, shapes) before any
sum is read, and sums are checked finite, counts positive, when read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.files import atomic_file
from ..core.safetensors_header import HeaderError, open_checked
from ..errors import MemitError
from .covariance import FORWARD, IDENTITY_KEYS
from .hparams import FORWARD_DTYPES, PRODUCT_DTYPES

FORMAT_NAME = "memit-vllm.stats"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # two tensors per layer and short metadata
MAX_D_FF = 1 << 18
REDUCED = tuple(d for d in FORWARD_DTYPES if d != "float32")


@dataclass
class StatsFile:
    identity: dict[str, str]  # covariance.stats_identity
    counts: dict[int, int]  # layer -> tokens
    of: int = 1  # the pass was cut into `of` shards...
    parts: list[int] = field(default_factory=lambda: [0])  # ...and these are summed here
    description: str = ""
    provenance: dict = field(default_factory=dict)
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> sum of k k^T (empty: read from path)
    path: Path | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.counts)

    @property
    def d_ff(self) -> int:
        return int(self.identity["d_ff"])

    @property
    def budget(self) -> int | None:
        return None if self.identity["budget"] == "None" else int(self.identity["budget"])

    @property
    def forward(self) -> str:
        """The dtype the model ran in; imported statistics do not say (the reference records none)."""
        return self.identity.get(FORWARD, "float32")

    @property
    def complete(self) -> bool:
        return sorted(self.parts) == list(range(self.of))

    def shards_text(self) -> str:
        return "the whole pass" if self.of == 1 else f"shards {','.join(map(str, self.parts))} of {self.of}"

    def mom2_sum(self, layer: int) -> torch.Tensor:
        """The float64 sum of k k^T of `layer` (read from the file when not in memory)."""
        if layer in self.sums:
            return self.sums[layer]
        try:
            with safe_open(self.path, "pt") as f:
                t = f.get_tensor(f"layer{layer}.mom2_sum")
        except (SafetensorError, OSError) as e:
            raise MemitError(f"stats file {self.path}: cannot read the sums of layer {layer} ({type(e).__name__}); "
                             "truncated? compute it again") from e
        if not torch.isfinite(t).all():
            raise MemitError(f"stats file {self.path}: the sums of layer {layer} hold NaN or Inf; compute it again")
        return t

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {}
        for l in self.layers:
            tensors[f"layer{l}.mom2_sum"] = self.mom2_sum(l).to("cpu", torch.float64).contiguous()
            tensors[f"layer{l}.count"] = torch.tensor([float(self.counts[l])], dtype=torch.float64)
        meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), **self.identity,
                "layers": json.dumps(self.layers), "shards": json.dumps({"of": self.of, "parts": sorted(self.parts)}),
                "description": self.description, "provenance": json.dumps(self.provenance, sort_keys=True)}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    def check_for(self, model_sha: str, layers: list[int], d_ff: int, forward: str) -> None:
        """Refuse statistics that are not of this checkpoint, these layers and the dtype the model runs in for
        the statistics (`forward`: as the covariance cache, which keys entries by it), before any heavy work."""
        name = self.path.name if self.path else "the stats file"
        if not self.complete:
            raise MemitError(f"stats file {name} holds {self.shards_text()}: merge the others into it first "
                             "(memit-vllm stats merge)")
        if self.d_ff != d_ff:
            raise MemitError(f"stats file {name} has d_ff {self.d_ff}, this checkpoint {d_ff}: it is another model's")
        if self.identity["model"] != model_sha:
            raise MemitError(f"stats file {name} was computed on other weights (sha256 {self.identity['model'][:12]}, "
                             f"this checkpoint {model_sha[:12]}); compute or import it for this checkpoint")
        if self.forward != forward and not self.provenance.get("imported"):
            raise MemitError(f"stats file {name} was computed with the model in {self.forward}, this edit runs it in "
                             f"{forward}: compute it with stats compute --model-dtype {forward}, or edit with "
                             f"--stats-model-dtype {self.forward}")
        missing = [l for l in layers if l not in self.counts]
        if missing:
            raise MemitError(f"stats file {name} holds layers {self.layers}, not {missing}: compute them "
                             "(memit-vllm stats compute --layers) or edit the layers it holds (--layers)")

    def covariances(self, layers: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, dict]]:
        """C_l = sum / count for `layers`, and per layer the tokens (as layer_covariances reports them)."""
        covs = {l: self.mom2_sum(l) / self.counts[l] for l in layers}
        return covs, {l: {"tokens": self.counts[l], "cached": True} for l in layers}


def _bad(path: Path, what: str) -> MemitError:
    return MemitError(f"{path.name} is not a usable memit-vllm stats file: {what}")


def _json(path: Path, meta: dict, key: str, kind: type):
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError, RecursionError) as e:
        raise _bad(path, f"metadata {key!r} is missing or not JSON") from e
    if not isinstance(value, kind):
        raise _bad(path, f"metadata {key!r} is not a JSON {kind.__name__}")
    return value


def read_stats(path: str | os.PathLike) -> StatsFile:
    """A stats file's identity, layers, shards and counts (its sums are read when asked for): after the
    bounded header scan, one open reads the header and the counts."""
    path = Path(path)
    if not path.is_file():
        raise MemitError(f"stats file {path} does not exist (or is not a file)")
    try:
        with open_checked(path, MAX_HEADER_BYTES, "a stats file") as (meta, tensors, f):
            return _read(path, meta, tensors, f)
    except HeaderError as e:
        raise _bad(path, str(e)) from e


def _read(path: Path, meta: dict[str, str], tensors: dict[str, tuple[str, list[int]]], f) -> StatsFile:
    """The StatsFile a header describes, checked, with the counts read from the open file `f`."""
    if meta.get("format") != FORMAT_NAME:
        raise _bad(path, f"no format={FORMAT_NAME!r} (a reference .npz is read by memit-vllm stats import)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise _bad(path, f"format version {meta.get('format_version')!r}; this memit-vllm reads {FORMAT_VERSION}")
    if not all(isinstance(meta.get(k), str) for k in IDENTITY_KEYS):
        raise _bad(path, f"metadata lacks one of {', '.join(IDENTITY_KEYS)}")
    identity = {k: meta[k] for k in IDENTITY_KEYS + ((FORWARD,) if FORWARD in meta else ())}
    if identity.get(FORWARD, REDUCED[0]) not in REDUCED:
        raise _bad(path, f"forward must be one of {', '.join(REDUCED)} (absent: float32)")
    if not identity["d_ff"].isdigit() or not 0 < int(identity["d_ff"]) <= MAX_D_FF:
        raise _bad(path, f"d_ff must be an integer in 1..{MAX_D_FF}")
    if identity["budget"] != "None" and not identity["budget"].isdigit():
        raise _bad(path, "budget must be a token count or None")
    if identity["dtype"] not in PRODUCT_DTYPES:
        raise _bad(path, f"dtype must be one of {', '.join(PRODUCT_DTYPES)}")
    layers = _json(path, meta, "layers", list)
    shards = _json(path, meta, "shards", dict)
    of, parts = shards.get("of"), shards.get("parts")
    if not (isinstance(of, int) and of >= 1 and isinstance(parts, list) and parts and
            all(isinstance(p, int) and 0 <= p < of for p in parts) and len(set(parts)) == len(parts)):
        raise _bad(path, "shards must be {\"of\": N, \"parts\": [distinct indices below N]}")
    if not layers or not all(isinstance(l, int) and l >= 0 for l in layers) or len(set(layers)) != len(layers):
        raise _bad(path, "layers must be a list of distinct layer indices")
    d_ff = int(identity["d_ff"])
    expected = {f"layer{l}.{k}": ("F64", shape) for l in layers for k, shape in
                (("mom2_sum", [d_ff, d_ff]), ("count", [1]))}
    if {k: (d, list(s)) for k, (d, s) in tensors.items()} != expected:
        raise _bad(path, f"its tensors must be layer<l>.mom2_sum (F64 [{d_ff}, {d_ff}]) and layer<l>.count (F64 [1]) "
                         "for exactly its layers")
    counts = {}
    for l in layers:
        c = float(f.get_tensor(f"layer{l}.count").item())
        if not (c >= 1 and c == int(c)):
            raise _bad(path, f"the token count of layer {l} is not a positive integer")
        counts[l] = int(c)
    return StatsFile(identity, counts, of, parts, meta.get("description", ""),
                     _json(path, meta, "provenance", dict) if "provenance" in meta else {}, path=path)


def merge_stats(files: list[StatsFile]) -> StatsFile:
    """The sum of shards of one pass: same identity, layers and number of shards, no part twice. Added
    in the order of their parts, whatever the order given, so a merge gives one result."""
    if len(files) < 2:
        raise MemitError("stats merge takes two or more stats files")
    first = files[0]
    seen: dict[int, Path | None] = {}
    for f in files:
        for key in (*IDENTITY_KEYS, FORWARD):
            mine, theirs = f.identity.get(key, "float32"), first.identity.get(key, "float32")  # only FORWARD may lack
            if mine != theirs:
                raise MemitError(f"stats merge: {f.path.name} and {first.path.name} differ in {key} "
                                 f"({mine[:40]!r} vs {theirs[:40]!r}); only shards of one pass merge")
        if f.layers != first.layers or f.of != first.of:
            raise MemitError(f"stats merge: {f.path.name} holds layers {f.layers} of {f.of} shards, {first.path.name} "
                             f"layers {first.layers} of {first.of}; only shards of one pass merge")
        for p in f.parts:
            if p in seen:
                raise MemitError(f"stats merge: shard {p}/{f.of} is in both {seen[p].name} and {f.path.name}; "
                                 "give each shard once")
            seen[p] = f.path
    ordered = sorted(files, key=lambda f: min(f.parts))
    sums = {}
    for l in first.layers:
        sums[l] = ordered[0].mom2_sum(l).clone()
        for f in ordered[1:]:
            sums[l] += f.mom2_sum(l)
    return StatsFile(dict(first.identity), {l: sum(f.counts[l] for f in files) for l in first.layers}, first.of,
                     sorted(seen), first.description, first.provenance, sums)


def stats_for_edit(path: str | os.PathLike, model_sha: str, layers: list[int], d_ff: int, forward: str) -> StatsFile:
    """A stats file checked against the checkpoint, the edited layers and the dtype the model will run in,
    before the model loads."""
    stats = read_stats(path)
    stats.check_for(model_sha, layers, d_ff, forward)
    return stats
