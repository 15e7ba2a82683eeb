"""The patch header reader against safetensors' own: on fuzzed files both accept or both refuse (the patch
rules, F32 deltas and the metadata fields, come on top), and a header built to cost memory is refused
before it is parsed, within a memory bound."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from memit_vllm.patch import CorruptPatchError, load_patch
from memit_vllm.patch.format import _read_header
from memit_vllm.testing.synthetic import facts, mutate, synthetic_patch

HEADER_MUTATIONS = ("truncate", "flip", "header", "append")


def safetensors_accepts(path: Path) -> bool:
    """safe_open's verdict, plus the one patch rule on the header itself: F32 deltas."""
    try:
        with safe_open(path, "pt") as f:
            return all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
    except SafetensorError:
        return False


def reader_accepts(path: Path) -> bool:
    try:
        _read_header(path)
        return True
    except CorruptPatchError:
        return False


@pytest.fixture(scope="module")
def seed_file(tiny_models):
    with tempfile.TemporaryDirectory() as d:
        return synthetic_patch(tiny_models["llama"]).save(Path(d) / "seed.patch").read_bytes()


def _raw(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


# Headers that looser readers accepted: duplicate keys, NaN, integers past 2^64, floats, leading space.
CRAFTED = [
    b'{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"}}',
    b'{"x":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}',
    b'{"x":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,0]}}',
    b'{"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}',
    b'{"x":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
    b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b' {"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}',
    b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}',
    b'{"__metadata__":{"a":1}}',
    b'{}',
]


def test_crafted_headers_get_the_verdict_of_safetensors(tmp_path):
    path = tmp_path / "h.patch"
    for header in CRAFTED:
        path.write_bytes(_raw(header, b"\0" * 4))
        assert reader_accepts(path) == safetensors_accepts(path), header


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(HEADER_MUTATIONS), rnd=st.randoms(use_true_random=False))
def test_fuzzed_files_get_the_verdict_of_safetensors(seed_file, kind, rnd: random.Random):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed.patch"
        path.write_bytes(mutate(seed_file, kind, rnd, Path(d) / "scratch.patch"))
        assert reader_accepts(path) == safetensors_accepts(path)


_COSTLY = {
    "metadata keys": lambda n: json.dumps({"__metadata__": {f"k{i}": "" for i in range(n // 8)}}),
    "tensors": lambda n: json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                                     for i in range(n // 56)}),
    "one long shape": lambda n: '{"x":{"dtype":"F32","shape":[%s],"data_offsets":[0,0]}}' % ",".join(["0"] * (n // 2)),
}


@pytest.mark.parametrize("kind", sorted(_COSTLY))
def test_a_header_built_to_cost_memory_is_refused_within_a_memory_bound(tmp_path, kind):
    """22 MB of tiny JSON entries costs ~12x that to parse (safetensors too); the reader refuses it after
    a scan, in a fresh process whose peak memory must stay within 3x the header above its baseline."""
    path = tmp_path / "costly.patch"
    path.write_bytes(_raw(_COSTLY[kind](22 << 20).encode()))
    script = f"""
import resource, sys
from memit_vllm.patch import CorruptPatchError, load_patch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_patch({str(path)!r})
except CorruptPatchError as e:
    print("refused:", e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    refused, grown = out.stdout.strip().splitlines()
    assert "header has more entries than a patch holds" in refused
    assert int(grown) < 3 * path.stat().st_size, f"{int(grown) >> 20} MiB for a {path.stat().st_size >> 20} MiB header"


def test_a_patch_of_ten_thousand_facts_is_well_within_the_bounds(tiny_models, tmp_path):
    patch = synthetic_patch(tiny_models["llama"], requests=facts("big", 10_000)).save(tmp_path / "big.patch")
    assert len(load_patch(patch, verify_content=True).requests) == 10_000
