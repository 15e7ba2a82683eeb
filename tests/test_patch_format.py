"""The patch file format: round trip, determinism, every error type, and a fuzz of broken files."""

import json
import random
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.cli import main
from memit_vllm.patch import (FORMAT_NAME, BaseMismatchError, CorruptPatchError, LineageError, MissingMetadataError,
                              NonFiniteError, NotAPatchError, Patch, PatchError, ShapeMismatchError,
                              UnsupportedVersionError, load_patch)
from memit_vllm.patch.merge import PatchSet
from memit_vllm.testing.synthetic import MUTATIONS, edit_header, mutate, synthetic_patch


def fields(p: Patch) -> dict:
    """A patch's constructor arguments, without what it caches (its id, its verification)."""
    return {k: v for k, v in p.__dict__.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture
def saved(llama, tmp_path):
    return synthetic_patch(llama).save(tmp_path / "p.patch")


def test_round_trip_keeps_everything_and_reads_lazily(llama, tmp_path):
    p = synthetic_patch(llama, layers=(0, 3), rank=3)
    q = load_patch(p.save(tmp_path / "p.patch"), verify_content=True)
    assert not isinstance(q.deltas, dict)  # lazy: read from disk when asked for
    assert q.layers == p.layers == ["model.layers.0.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    for n in p.deltas:
        assert torch.equal(q.deltas[n], p.deltas[n]) and q.deltas[n].dtype == torch.float32
    for attr in ("base", "base_weights", "requests", "hparams", "covariance", "stats", "name", "version",
                 "parents", "created", "tool_version", "patch_id"):
        assert getattr(q, attr) == getattr(p, attr), attr
    # Plain safetensors reads it too (no pickle, no custom code).
    with safe_open(tmp_path / "p.patch", "pt") as f:
        assert f.metadata()["format"] == FORMAT_NAME and f.metadata()["patch_id"] == p.patch_id


def test_patch_id_is_that_of_the_stored_fp32_content(llama, tmp_path):
    p = synthetic_patch(llama)
    p64 = Patch(**{**fields(p), "deltas": {n: d.double() for n, d in p.deltas.items()}})
    assert p64.patch_id == p.patch_id == load_patch(p64.save(tmp_path / "p.patch")).patch_id
    assert synthetic_patch(llama, seed=1).patch_id != p.patch_id
    assert Patch(**{**fields(p), "name": "other"}).patch_id != p.patch_id
    assert Patch(**{**fields(p), "created": "2001-01-01T00:00:00Z"}).patch_id == p.patch_id


def test_same_inputs_same_bytes(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = synthetic_patch(llama).save(tmp_path / "a.patch")
    b = synthetic_patch(llama).save(tmp_path / "b.patch")
    assert a.read_bytes() == b.read_bytes()
    assert load_patch(a).created == "2023-11-14T22:13:20Z"


def _error_cases(llama, smollm2, tmp_path):
    """(file, model, expected error, text the message must contain) for every error type."""
    p = synthetic_patch(llama)
    good = p.save(tmp_path / "good.patch")
    data = good.read_bytes()
    cases = {}
    (tmp_path / "truncated.patch").write_bytes(data[:-100])
    cases["truncated"] = (tmp_path / "truncated.patch", llama, CorruptPatchError, "truncated")
    flipped = bytearray(data)
    flipped[-5] ^= 0x40
    (tmp_path / "flipped.patch").write_bytes(bytes(flipped))
    cases["flipped"] = (tmp_path / "flipped.patch", llama, CorruptPatchError, "patch id")
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    cases["foreign"] = (tmp_path / "foreign.safetensors", llama, NotAPatchError, "not a memit-vllm patch")
    for name, fn, err, text in [
        ("future", lambda h: h["__metadata__"].update(format_version="3"), UnsupportedVersionError, "version 3"),
        ("nometa", lambda h: h["__metadata__"].pop("base_weights"), MissingMetadataError, "base_weights"),
    ]:
        path = tmp_path / f"{name}.patch"
        path.write_bytes(data)
        edit_header(path, fn)
        cases[name] = (path, llama, err, text)
    tensor = "model.layers.1.mlp.down_proj.weight"
    cases["wrong base"] = (good, smollm2, BaseMismatchError, tensor)
    transposed = {n: d.T.contiguous() if n == tensor else d for n, d in p.deltas.items()}
    cases["shape"] = (Patch(**{**fields(p), "deltas": transposed}).save(tmp_path / "shape.patch"), llama,
                      ShapeMismatchError, tensor)
    cases["lineage"] = (Patch(**{**fields(p), "made_on": ["mp1-" + "0" * 32]}).save(tmp_path / "on.patch"), llama,
                        LineageError, "was made on the stack")
    nan = tmp_path / "nan.patch"
    nan.write_bytes(data[:-4] + struct.pack("<f", float("nan")))
    cases["nan"] = (nan, llama, NonFiniteError, "NaN")
    return cases


def test_every_error_is_a_patch_error_and_a_one_line_cli_message(llama, smollm2, tmp_path):
    cases = _error_cases(llama, smollm2, tmp_path)
    assert {c[2] for c in cases.values()} == set(PatchError.__subclasses__())
    for label, (path, model, err, text) in cases.items():
        with pytest.raises(err, match=text.replace("(", r"\(")):
            PatchSet([load_patch(path, verify_content=True)]).validate(Checkpoint(model))
        result = CliRunner().invoke(main, ["verify", str(path), "--model", str(model)])
        assert result.exit_code == 2, (label, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], (label, lines)


def test_nan_delta_is_refused_when_saving(llama, tmp_path):
    p = synthetic_patch(llama)
    p.deltas[p.layers[0]][0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        p.save(tmp_path / "inf.patch")
    assert list(tmp_path.iterdir()) == []


def test_real_process_exit_code_and_debug_traceback(tmp_path):
    (tmp_path / "x.patch").write_bytes(b"\x00" * 5)
    run = [sys.executable, "-m", "memit_vllm"]
    out = subprocess.run([*run, "inspect", str(tmp_path / "x.patch")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = subprocess.run([*run, "--debug", "inspect", str(tmp_path / "x.patch")], capture_output=True, text=True)
    assert "Traceback" in out.stderr and "CorruptPatchError" in out.stderr


@pytest.mark.parametrize("command", [["inspect"], ["make-patch", "--model", "smollm2-135m", "--out", "p.patch",
                                                   "--requests"], ["eval", "--model", "smollm2-135m", "--data"]])
def test_a_path_too_long_for_a_file_name_is_one_line_at_every_entry_point(command, tmp_path):
    """The operating system's refusal of a path (here ENAMETOOLONG, raised by the first look at it, wherever
    that is) is one line naming the path, exit 2, at every command; --debug shows the traceback."""
    too_long = str(tmp_path / ("z" * 300))
    run = [sys.executable, "-m", "memit_vllm"]
    out = subprocess.run([*run, *command, too_long], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip()  # "cannot use PATH" (the CLI's) or "cannot open patch file NAME" (load_patch's)
    assert "\n" not in line and "z" * 300 in line and line.endswith(": File name too long"), line
    out = subprocess.run([*run, "--debug", *command, too_long], capture_output=True, text=True, cwd=tmp_path)
    assert "Traceback" in out.stderr and "OSError" in out.stderr


@pytest.mark.parametrize("command", [["inspect"], ["make-patch", "--model", "smollm2-135m", "--out", "p.patch",
                                                   "--requests"], ["eval", "--model", "smollm2-135m", "--data"]])
def test_a_newline_in_a_file_name_is_escaped_to_keep_every_message_one_line(command, tmp_path):
    """A message is one line wherever it is read (MemitError's text: the CLI, vLLM's log, an admin route);
    a newline in a file name split it in two."""
    path = tmp_path / "two\nlines.json"
    path.write_text("x")
    out = subprocess.run([sys.executable, "-m", "memit_vllm", *command, str(path)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "two\\nlines.json" in out.stderr, out.stderr
    with pytest.raises(PatchError) as refused:
        load_patch(path)
    assert "\n" not in str(refused.value) and "two\\nlines.json" in str(refused.value)


def test_a_loop_of_links_is_named_as_one_not_as_missing(tmp_path):
    """The same PatchError from the CLI and from the server's loader (load_patch, which both call)."""
    (tmp_path / "a.patch").symlink_to(tmp_path / "b.patch")
    (tmp_path / "b.patch").symlink_to(tmp_path / "a.patch")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "a.patch")])
    assert result.exit_code == 2 and \
        result.stderr == "error: cannot open patch file a.patch: Too many levels of symbolic links\n"
    with pytest.raises(PatchError, match="cannot open patch file a.patch: Too many levels of symbolic links"):
        load_patch(tmp_path / "a.patch")


def test_a_patch_whose_path_is_not_utf8_is_refused_for_its_name_not_its_bytes(llama, tmp_path):
    """safetensors opens UTF-8 paths only: a valid patch under such a name read as "not a valid safetensors
    file ... truncated or modified?"."""
    import os

    path = synthetic_patch(llama).save(tmp_path / os.fsdecode(b"\xff.patch"))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].endswith(".patch: its path is not UTF-8 text, and safetensors opens no other: rename it")


@pytest.fixture(scope="module")
def fuzz_seed(llama):
    with tempfile.TemporaryDirectory() as d:
        return synthetic_patch(llama).save(Path(d) / "seed.patch").read_bytes(), Checkpoint(llama)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(MUTATIONS), rnd=st.randoms(use_true_random=False))
def test_fuzzed_patch_files_raise_only_patch_errors(fuzz_seed, kind, rnd: random.Random):
    data, ckpt = fuzz_seed
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed.patch"
        path.write_bytes(mutate(data, kind, rnd, Path(d) / "scratch.patch"))
        try:
            PatchSet([load_patch(path, verify_content=True)]).validate(ckpt)
        except PatchError:
            pass


def test_unmutated_seed_passes(fuzz_seed, tmp_path):
    data, ckpt = fuzz_seed
    (tmp_path / "p.patch").write_bytes(data)
    PatchSet([load_patch(tmp_path / "p.patch", verify_content=True)]).validate(ckpt)
    assert json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]["format"] == FORMAT_NAME
