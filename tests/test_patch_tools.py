"""inspect / verify / apply / stack / diff on synthetic patches of the tiny models (and SmolLM2)."""

import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.architectures import ARCHITECTURES
from memit_vllm.cli import main
from memit_vllm.errors import MemitError
from memit_vllm.patch import BaseMismatchError, load_patch
from memit_vllm.patch.tools import APPLIED_FILE, apply_patches, diff_patches, numerical_rank, stack_patches
from memit_vllm.testing.synthetic import facts, synthetic_patch
from memit_vllm.testing.tiny_models import build_tiny_model


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_numerical_rank_of_rank_k_deltas():
    g = torch.Generator().manual_seed(0)
    for k in (0, 1, 3, 7):
        d = (torch.randn(50, k, generator=g) @ torch.randn(k, 80, generator=g)).float()
        assert numerical_rank(d)[0] == k
    assert numerical_rank(torch.ones(5))[0] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inspect_reports_layers_norms_ranks_and_facts(tiny_models, tmp_path, arch):
    p = synthetic_patch(tiny_models[arch], layers=(1, 2), rank=3, scale=0.25)
    path = p.save(tmp_path / "p.patch")
    r = json.loads(cli("inspect", path, "--json").output)
    assert r["patch_id"] == p.patch_id and r["file_size"] == path.stat().st_size and r["n_facts"] == 3
    assert r["base"]["architecture"] == Checkpoint(tiny_models[arch]).architecture
    assert [(layer["name"], layer["rank"]) for layer in r["layers"]] == [(n, 3) for n in p.layers]
    assert all(abs(layer["norm"] - 0.25) < 1e-5 for layer in r["layers"])
    if arch == "gpt2":  # Conv1D layout: (d_ff, d_model)
        assert r["layers"][0]["shape"] == [128, 64]
    text = cli("inspect", path).output
    assert p.patch_id in text and "s0 place 2 is located in -> City2 (was: Paris)" in text


def test_verify_passes_on_its_base(tiny_models, tmp_path):
    patch = synthetic_patch(tiny_models["qwen2"])
    path = patch.save(tmp_path / "p.patch")
    out = cli("verify", path, "--model", tiny_models["qwen2"], "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["patch_id"] == patch.patch_id and r["config_matches"]
    ckpt = Checkpoint(tiny_models["qwen2"])
    assert {t["name"]: t["base_sha256"] for t in r["tensors"]} == {n: ckpt.fingerprint(n) for n in patch.layers}
    assert cli("verify", path, "--model", tiny_models["qwen2"]).exit_code == 0


def test_tiny_llama_patch_is_refused_on_smollm2_and_apply_leaves_nothing(tiny_models, smollm2, tmp_path):
    path = synthetic_patch(tiny_models["llama"]).save(tmp_path / "p.patch")
    for args in (["verify", path, "--model", smollm2], ["apply", path, "--model", smollm2, "--out", tmp_path / "out"]):
        out = cli(*args)
        assert out.exit_code == 2
        assert "model.layers.1.mlp.down_proj.weight" in out.stderr and out.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.patch"]


def _merged_weights(model_dir) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(model_dir)
    return {n: ckpt.tensor(n) for n in ckpt.keys()}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_apply_writes_w_plus_delta_that_transformers_loads(tiny_models, tmp_path, arch):
    base = tiny_models[arch]
    p = synthetic_patch(base)
    path = p.save(tmp_path / "p.patch")
    out = cli("apply", path, "--model", base, "--out", tmp_path / "edited")
    assert out.exit_code == 0, out.output
    edited = tmp_path / "edited"
    assert out.output.strip().splitlines()[-1] == str(edited)
    before, after = _merged_weights(base), _merged_weights(edited)
    assert before.keys() == after.keys()
    for n in before:
        expected = before[n] + p.deltas[n] if n in p.deltas else before[n]
        assert torch.equal(after[n], expected), n
    assert {f.name for f in edited.iterdir()} >= {"config.json", "tokenizer.json", "tokenizer_config.json"}
    assert json.loads((edited / APPLIED_FILE).read_text())["patches"][0]["patch_id"] == p.patch_id
    model = AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32)
    params = dict(model.named_parameters())
    for n, d in p.deltas.items():
        assert torch.equal(params[n].detach(), before[n] + d)  # GPT-2 included: Conv1D keeps the stored layout


def test_apply_keeps_dtype_and_sharding(smollm2, tmp_path):
    src = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tmp_path / "fp32", smollm2))
    model.to(torch.bfloat16).save_pretrained(src, max_shard_size="2MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((tmp_path / "fp32" / f).read_bytes())
    assert (src / "model.safetensors.index.json").is_file()
    p = synthetic_patch(src, layers=(0, 3))
    edited = apply_patches([p], src, tmp_path / "edited")
    assert (edited / "model.safetensors.index.json").read_bytes() == (src / "model.safetensors.index.json").read_bytes()
    assert sorted(f.name for f in edited.glob("*.safetensors")) == sorted(f.name for f in src.glob("*.safetensors"))
    ckpt = Checkpoint(src)
    for n, d in p.deltas.items():
        merged = Checkpoint(edited).tensor(n)
        assert merged.dtype == torch.bfloat16
        assert torch.equal(merged, (ckpt.tensor(n).float() + d).to(torch.bfloat16))
    AutoModelForCausalLM.from_pretrained(edited)


def test_apply_failure_midway_leaves_no_output(tiny_models, tmp_path, monkeypatch):
    from memit_vllm.patch import tools

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tools, "_write_merged_shard", boom)
    with pytest.raises(MemitError, match="cannot write the merged checkpoint to .*: No space left on device"):
        apply_patches([synthetic_patch(tiny_models["llama"])], tiny_models["llama"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert cli("apply", synthetic_patch(tiny_models["llama"]).save(tmp_path / "p.patch"), "--model",
               tiny_models["llama"], "--out", tmp_path / "taken").exit_code == 2


def test_stack_applied_equals_applying_in_order(tiny_models, tmp_path):
    base = tiny_models["llama"]
    p1 = synthetic_patch(base, layers=(1, 2), seed=1, name="one").save(tmp_path / "1.patch")
    p2 = synthetic_patch(base, layers=(2, 3), seed=2, name="two").save(tmp_path / "2.patch")
    out = cli("stack", p1, p2, "-o", tmp_path / "s.patch", "--name", "both", "--version", "3")
    assert out.exit_code == 0, out.output
    s = load_patch(tmp_path / "s.patch", verify_content=True)
    a, b = load_patch(p1), load_patch(p2)
    assert (s.name, s.version, s.parents) == ("both", "3", [a.patch_id, b.patch_id])
    assert s.requests == a.requests + b.requests and s.layers == sorted(set(a.layers) | set(b.layers))
    assert cli("apply", p1, p2, "--model", base, "--out", tmp_path / "ab").exit_code == 0
    assert cli("apply", tmp_path / "s.patch", "--model", base, "--out", tmp_path / "s").exit_code == 0
    ab, st = _merged_weights(tmp_path / "ab"), _merged_weights(tmp_path / "s")
    for n in ab:
        torch.testing.assert_close(st[n], ab[n], rtol=0, atol=1e-6)


def test_stack_refuses_patches_of_different_bases(tiny_models):
    with pytest.raises(BaseMismatchError):
        stack_patches([synthetic_patch(tiny_models["llama"]), synthetic_patch(tiny_models["mistral"])])


def test_diff_names_facts_and_tensor_differences(tiny_models, tmp_path):
    base = tiny_models["llama"]
    old = facts("x", 3)
    new = [old[0], {**old[1], "target_new": {"str": "Rome"}}, *facts("y", 1)]
    a = synthetic_patch(base, layers=(1, 2), requests=old).save(tmp_path / "a.patch")
    b = synthetic_patch(base, layers=(2, 3), seed=5, requests=new).save(tmp_path / "b.patch")
    r = json.loads(cli("diff", a, b, "--json").output)
    assert r["same_base"]
    assert r["facts_added"] == ["y place 0 is located in -> City0 (was: Paris)"]
    assert r["facts_removed"] == ["x place 2 is located in -> City2 (was: Paris)"]
    assert [c["b"] for c in r["facts_changed"]] == ["x place 1 is located in -> Rome (was: Paris)"]
    rows = {t["name"].split(".")[2]: t for t in r["tensors"]}
    assert (rows["1"]["in"], rows["2"]["in"], rows["3"]["in"]) == ("a", "both", "b")
    pa, pb = load_patch(a), load_patch(b)
    n2 = "model.layers.2.mlp.down_proj.weight"
    assert rows["2"]["diff_norm"] == pytest.approx(float((pb.deltas[n2].double() - pa.deltas[n2].double()).norm()))
    same = diff_patches(pa, pa)
    assert not (same["facts_added"] or same["facts_removed"] or same["facts_changed"])
    assert all(t["diff_norm"] == 0 for t in same["tensors"])
    assert "~ x place 1 is located in -> City1 (was: Paris)  =>  x place 1 is located in -> Rome" in cli(
        "diff", a, b).output



def test_outputs_that_cannot_be_written_are_one_line_errors(tiny_models, tmp_path):
    model = tiny_models["llama"]
    patch = synthetic_patch(model).save(tmp_path / "p.patch")
    (tmp_path / "dir").mkdir()
    fifo = tmp_path / "fifo"  # stands for /dev/null: renamed over, the device itself became a regular file
    os.mkfifo(fifo)
    blocked = tmp_path / "p.patch" / "below-a-file"  # no directory can be made there (not even by root)
    not_regular = "is not a regular file (a device, a FIFO...); give the path of a file to write"
    data = tmp_path / "never-read.json"  # the outputs are refused before the data, model or servers are read
    for args, message in [
        (["stack", patch, "-o", tmp_path / "dir"], f"--output {tmp_path / 'dir'} is a directory"),
        (["stack", patch, "-o", fifo], f"--output {fifo} {not_regular}"),
        (["stack", patch, "-o", blocked], f"--output {blocked}: cannot write there"),
        (["make-patch", "--model", model, "--requests", data, "--out", fifo], f"--out {fifo} {not_regular}"),
        (["make-patch", "--model", model, "--requests", patch, "--out", patch],  # the patch replaced its input
         f"--out {patch} is the input {patch}; writing there would replace it: pick another path"),
        (["eval", "--model", model, "--data", data, "--patch", patch, "--json", patch], f"--json {patch} is the input"),
        (["stats", "merge", patch, "--out", fifo], f"--out {fifo} {not_regular}"),
        (["eval", "--model", model, "--data", data, "--json", tmp_path / "dir"], "--json "),
        (["eval", "--model", model, "--data", data, "--plot", fifo], f"--plot {fifo} {not_regular}"),
        (["ab", "--a", "http://127.0.0.1:1", "--b", "http://127.0.0.1:1", "--edits", data, "--json", fifo],
         f"--json {fifo} {not_regular}"),
        (["apply", patch, "--model", model, "--out", blocked], "cannot write the merged checkpoint to"),
        (["export-lora", patch, "--out", blocked], "cannot write the adapter to"),
    ]:
        result = cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.output)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["dir", "fifo", "p.patch"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
