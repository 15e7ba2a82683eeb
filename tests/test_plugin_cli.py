"""`memit-vllm serve` as a command-line builder: what it hands to vLLM, and what it refuses before
spending a minute on an engine start; the plugin's checks and version gate. No engine here."""

from __future__ import annotations

import json
import logging
import os
import shutil
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import memit_vllm_plugin
from memit_vllm.cli import main
from memit_vllm.core.architectures import ARCHITECTURES
from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY, PLUGIN, SERVER_MODULE
from memit_vllm.core.versions import ALLOW_UNTESTED_ENV
from memit_vllm.errors import MemitError
from memit_vllm.patch import load_patch
from memit_vllm.serve import default_model, server_command, server_env
from memit_vllm.testing.synthetic import synthetic_patch
from memit_vllm_plugin import compat


def test_server_command_sets_load_format_and_merges_loader_config():
    cmd = server_command("M", ["/p/a.patch", "/p/b.patch"],
                         ["--port", "8000", "--model-loader-extra-config", '{"enable_multithread_load": true}'])
    assert cmd[1:7] == ["-m", SERVER_MODULE, "--model", "M", "--load-format", LOAD_FORMAT]
    assert json.loads(cmd[cmd.index("--model-loader-extra-config") + 1]) == {
        "enable_multithread_load": True, PATCHES_KEY: ["/p/a.patch", "/p/b.patch"]}
    assert cmd[-2:] == ["--port", "8000"]
    eq_form = server_command("M", ["a"], ['--model-loader-extra-config={"num_threads": 2}'])
    extra = json.loads(eq_form[eq_form.index("--model-loader-extra-config") + 1])
    assert extra == {"num_threads": 2, PATCHES_KEY: ["a"]}
    for value, message in (("[1]", "expected a JSON object"), ('{"a": 1, "a": 2}', "key 'a' appears twice")):
        with pytest.raises(MemitError, match=message):  # a list was a TypeError
            server_command("M", ["a"], ["--model-loader-extra-config", value])
    # The worker side of the admin routes: the qualified name vLLM resolves must be our class.
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from memit_vllm_plugin.worker import MemitWorkerExtension

    assert resolve_obj_by_qualname(cmd[cmd.index("--worker-extension-cls") + 1]) is MemitWorkerExtension


def test_serve_refuses_another_load_format(tiny_models, tmp_path):
    model = tiny_models["llama"]
    patch = synthetic_patch(model, layers=(1,)).save(tmp_path / "p.patch")
    result = CliRunner().invoke(main, ["serve", str(model), "--memit-patch", str(patch), "--load-format", "auto"])
    assert result.exit_code == 2 and "drop --load-format" in result.output


def test_server_env_names_the_plugin_and_keeps_the_other_general_plugins():
    env = server_env({})["VLLM_PLUGINS"].split(",")
    assert PLUGIN in env and "lora_filesystem_resolver" in env  # vLLM's own general plugin
    assert server_env({"VLLM_PLUGINS": "other"})["VLLM_PLUGINS"] == f"other,{PLUGIN}"
    assert server_env({"VLLM_PLUGINS": PLUGIN})["VLLM_PLUGINS"] == PLUGIN


def test_serve_refuses_missing_patch_and_quantized_checkpoint(tiny_models, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["serve", str(tiny_models["llama"]), "--memit-patch", str(tmp_path / "no.patch")])
    assert result.exit_code == 2 and "does not exist" in result.output

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_models["llama"], quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    patch = synthetic_patch(tiny_models["llama"], layers=(1,)).save(tmp_path / "p.patch")
    result = runner.invoke(main, ["serve", str(quantized), "--memit-patch", str(patch)])
    assert result.exit_code == 2
    assert "pre-quantized (gptq)" in result.output and "LoRA" in result.output


def test_a_default_model_name_is_served_from_its_checkpoint_dir_under_its_name(smollm2):
    assert default_model("smollm2-135m", ("--port", "1")) == (
        str(smollm2), ("--served-model-name", "smollm2-135m", "--port", "1"))
    assert default_model("smollm2-135m", ("--served-model-name=x",)) == (str(smollm2), ("--served-model-name=x",))
    assert default_model("org/name", ("--port", "1")) == ("org/name", ("--port", "1"))


def test_an_untested_vllm_is_refused_in_one_line_unless_allowed(monkeypatch, caplog):
    monkeypatch.setattr(compat, "TESTED_VLLM", ">=0.1,<0.2")
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    result = CliRunner().invoke(main, ["serve", "M"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert f"vLLM {compat.vllm_version()} is installed" in result.output
    assert f"{ALLOW_UNTESTED_ENV}=1" in result.output

    # In vLLM's processes: one line, and no load format (vLLM itself must keep working).
    monkeypatch.setattr(memit_vllm_plugin, "_registered", False)
    monkeypatch.setattr(compat.logger, "propagate", False)  # vLLM's logging config may or may not be in place
    compat.logger.addHandler(caplog.handler)
    try:
        memit_vllm_plugin.register()
    finally:
        compat.logger.removeHandler(caplog.handler)
    [record] = caplog.records
    assert record.levelno == logging.ERROR and f"the '{LOAD_FORMAT}' load format is not registered" in record.message

    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    compat.check_vllm()


def test_a_made_up_architecture_in_the_table_is_enough_for_the_loader_and_export_lora(
        made_up_architecture, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM
    from vllm.config.load import LoadConfig

    from memit_vllm.lora_export import export_lora
    from memit_vllm_plugin.loader import MemitModelLoader
    from memit_vllm_plugin.patches import describe
    from memit_vllm_plugin.worker import served_module

    arch = ARCHITECTURES["madeup"]
    patch = synthetic_patch(made_up_architecture, layers=(1, 2)).save(tmp_path / "p.patch")
    loader = MemitModelLoader(LoadConfig(load_format=LOAD_FORMAT,
                                         model_loader_extra_config={PATCHES_KEY: [str(patch)]}))
    config = json.loads((made_up_architecture / "config.json").read_text())
    hf_config = SimpleNamespace(to_dict=lambda: config, architectures=config["architectures"], model_type="madeup")
    loader._check_before_loading(SimpleNamespace(model=str(made_up_architecture), revision=None, hf_config=hf_config))
    assert describe(loader.patches.patches[0])["layers"] == [1, 2]

    # The worker finds the served module through the table (the HF model has the served module names).
    served = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    assert served_module(served, arch, "model.layers.2.mlp.down_proj.weight") is served.model.layers[2].mlp.down_proj

    report = export_lora(patch, tmp_path / "adapter")
    assert report["r"] == 2 and report["max_rel_error"] < 1e-6


def test_serve_refuses_a_weak_token_a_bad_patch_dir_and_a_state_it_does_not_match(tiny_models, tmp_path,
                                                                                  monkeypatch):
    from memit_vllm.core.contract import ADMIN_TOKEN_ENV, DRAIN_TIMEOUT_ENV, PATCH_DIR_ENV, RPC_TIMEOUT_ENV, STATE_FILE

    def started(*args):
        raise AssertionError("serve would start vLLM")

    monkeypatch.setattr(os, "execve", started)
    model = tiny_models["llama"]
    runner = CliRunner()
    for env, message in [({ADMIN_TOKEN_ENV: "short"}, "fewer than 16"),
                         ({ADMIN_TOKEN_ENV: "0123456789abcdef\n"}, "whitespace"),
                         ({PATCH_DIR_ENV: str(tmp_path / "none")}, "is not a directory"),
                         ({DRAIN_TIMEOUT_ENV: "soon"}, "expected a positive number of seconds"),
                         ({RPC_TIMEOUT_ENV: "-1"}, "expected a positive number of seconds")]:
        result = runner.invoke(main, ["serve", str(model)], env=env)
        assert result.exit_code == 2 and message in result.output, result.output

    state = tmp_path / "state"
    recorded = synthetic_patch(model, layers=(1,), seed=1).save(state / "patches" / "a" / "a.patch")
    (state / STATE_FILE).write_text(json.dumps({"patches": [{"id": "mp1-" + "0" * 32, "file": "patches/a/a.patch"}]}))
    result = runner.invoke(main, ["serve", str(model), "--memit-state", str(state)])
    assert result.exit_code == 2 and "remove" in result.output and "holds patch" in result.output, result.output
    (state / STATE_FILE).write_text(json.dumps({"patches": [{"id": load_patch(recorded).patch_id,
                                                             "file": "patches/a/a.patch"}]}))
    other = synthetic_patch(model, layers=(2,), seed=2).save(tmp_path / "other.patch")
    result = runner.invoke(main, ["serve", str(model), "--memit-state", str(state), "--memit-patch", str(other)])
    assert result.exit_code == 2 and "drop --memit-patch" in result.output, result.output


def test_serve_names_its_own_fix_for_a_variant_above_vllms_lora_rank(tiny_models, tmp_path, monkeypatch):
    """serve has no --max-rank: the refusal names what serve can do, and export-lora's flag for the export."""
    import memit_vllm.lora_export as lora_export
    from memit_vllm.cache import CACHE_ENV

    def started(*args):
        raise AssertionError("serve would start vLLM")

    monkeypatch.setattr(os, "execve", started)
    monkeypatch.setattr(lora_export, "VLLM_MAX_LORA_RANK", 1)  # the rank-2 patch below is then too big
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = tiny_models["llama"]
    patch = synthetic_patch(model, layers=(1,), rank=2).save(tmp_path / "p.patch")
    result = CliRunner().invoke(main, ["serve", str(model), "--memit-variant", f"edited={patch}"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert f"--memit-patch {patch}" in result.output and "memit-vllm export-lora" in result.output
    assert "pass --max-rank" not in result.output
    result = CliRunner().invoke(main, ["export-lora", str(patch), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "pass --max-rank R" in result.output, result.output


def test_serve_hashes_each_recorded_patch_once(tiny_models, tmp_path, monkeypatch):
    """--memit-state: the recorded stack is checked against its ids (one hash of each patch's content)
    and that check serves the validation too; vLLM gets the recorded files."""
    from memit_vllm.patch import Patch
    from memit_vllm_plugin.admin import write_state

    model, state = tiny_models["llama"], tmp_path / "state"
    stack = []
    for seed, layers in ((1, (1,)), (2, (1, 2))):
        patch = synthetic_patch(model, layers=layers, seed=seed)
        stack.append(load_patch(patch.save(state / "patches" / patch.patch_id / f"p{seed}.patch")))
    write_state(state, stack)
    hashed, started = [], []
    content_id = Patch.content_id
    monkeypatch.setattr(Patch, "content_id", lambda self, **kw: hashed.append(self.path) or content_id(self, **kw))
    monkeypatch.setattr(os, "execve", lambda *args: started.append(args[1]))
    result = CliRunner().invoke(main, ["serve", str(model), "--memit-state", str(state)])
    assert result.exit_code == 0 and started, result.output
    cmd = started[0]
    assert json.loads(cmd[cmd.index("--model-loader-extra-config") + 1])[PATCHES_KEY] == [str(p.path) for p in stack]
    assert sorted(hashed) == sorted(p.path for p in stack)
