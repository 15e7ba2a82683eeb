"""One refusal table: every entry point that takes patches refuses the same crafted patches with the same
error (the one validation, memit_vllm.patch.merge.PatchSet): verify, apply, stack, eval, export-lora,
serve's pre-check, `--memit-variant`, the vLLM loader (streaming a real checkpoint) and hot apply.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.cli import main
from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY, PATCHES_ROUTE
from memit_vllm.errors import MemitError
from memit_vllm.patch import BaseModel, Patch, load_patch
from memit_vllm.patch.merge import PatchSet
from memit_vllm.testing.synthetic import synthetic_patch
from test_admin_faults import make_server

TARGET = "model.layers.1.mlp.down_proj.weight"


def _patch(ckpt: Checkpoint, name: str, deltas: dict[str, torch.Tensor]) -> Patch:
    return Patch(deltas=deltas, base=BaseModel(str(ckpt.path), ckpt.architecture, ckpt.config_sha256),
                 base_weights={n: ckpt.fingerprint(n) for n in deltas}, requests=[], name=name, version="1")


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_models["llama"], tmp_path_factory.mktemp("m") / "llama"))


@pytest.fixture(scope="module")
def cases(model, tmp_path_factory) -> dict[str, list[Path]]:
    """case -> the stack (patch files, in order) every entry point must refuse."""
    d = tmp_path_factory.mktemp("crafted")
    ckpt = Checkpoint(model)
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    attention = _patch(ckpt, "attention", {q_proj: torch.full(ckpt.shape(q_proj), 1e-3)}).save(d / "attention.patch")
    # Each alone merges to a finite weight (W + 3e38 < 3.4e38); the two together overflow fp32.
    big = [_patch(ckpt, f"big{i}", {TARGET: torch.full(ckpt.shape(TARGET), 3e38)}).save(d / f"big{i}.patch")
           for i in (1, 2)]
    good = synthetic_patch(model, layers=(1, 2), name="good").save(d / "good.patch")
    altered = d / "altered.patch"
    data = bytearray(good.read_bytes())
    data[-4] ^= 0x01  # the lowest mantissa bit of the last delta value: still finite, another content
    altered.write_bytes(bytes(data))
    return {"attention": [attention], "overflow": big, "altered": [altered], "duplicate": [good, good]}


@pytest.fixture(scope="module")
def expected(cases, model) -> dict[str, str]:
    """The one message per case, from the library."""
    out = {}
    for case, paths in cases.items():
        with pytest.raises(MemitError) as e:
            PatchSet([load_patch(p) for p in paths]).validate(Checkpoint(model))
        out[case] = str(e.value)
    return out


@pytest.fixture(scope="module")
def model_config(model):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(model), dtype="float32")


def _cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, (args, result.output)
    return result.stderr.strip()


def _loader(paths, model_config) -> str:
    from vllm.config.load import LoadConfig

    from memit_vllm_plugin.loader import MemitLoadError, MemitModelLoader

    with pytest.raises(MemitLoadError) as e:
        loader = MemitModelLoader(LoadConfig(load_format=LOAD_FORMAT,
                                             model_loader_extra_config={PATCHES_KEY: [str(p) for p in paths]}))
        for _ in loader.get_all_weights(model_config, torch.nn.Module()):
            pass
    return str(e.value)


def _hot_apply(paths, model, tmp_path, monkeypatch) -> str:
    patch_dir = tmp_path / "patch-dir"
    patch_dir.mkdir(parents=True)
    shutil.copyfile(paths[-1], patch_dir / paths[-1].name)
    server = make_server(tmp_path, model, patch_dir, monkeypatch, startup=paths[:-1])
    status, answer = server.admin("POST", PATCHES_ROUTE, {"path": paths[-1].name})
    assert status in (409, 422), answer
    return answer["error"]


def test_every_entry_point_refuses_the_same_patches_with_the_same_error(
        cases, expected, model, model_config, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("serve accepted a patch it must refuse"))
    data = data_dir / "counterfact" / "counterfact_500.json"
    for case, paths in cases.items():
        flags = [a for p in paths for a in ("--patch", p)]
        answers = {
            "apply": _cli("apply", *paths, "--model", model, "--out", tmp_path / f"{case}-applied"),
            "stack": _cli("stack", *paths, "-o", tmp_path / f"{case}-stacked.patch"),
            "eval": _cli("eval", "--model", model, "--data", data, "--n", "1", *flags),
            "serve": _cli("serve", model, *[a for p in paths for a in ("--memit-patch", p)]),
            "loader": _loader(paths, model_config),
            "hot apply": _hot_apply(paths, model, tmp_path / case, monkeypatch),
        }
        if len(paths) == 1:
            answers["verify"] = _cli("verify", paths[0], "--model", model)
            answers["export-lora"] = _cli("export-lora", paths[0], "--out", tmp_path / f"{case}-lora")
            answers["variant"] = _cli("serve", model, "--memit-variant", f"v={paths[0]}")
        for entry, answer in answers.items():
            assert expected[case] in answer, (case, entry, expected[case], answer)
        assert not list(tmp_path.glob(f"{case}-*")), "a refusal must leave no output behind"
