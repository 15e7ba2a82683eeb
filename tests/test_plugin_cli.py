"""`memit-vllm serve` as a command-line builder: what it hands to vLLM, and what it refuses before
spending a minute on an engine start. No engine here."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from memit_vllm.cli import main
from memit_vllm.serve import SERVER_MODULE, server_command, server_env
from patch_fixtures import synthetic_patch


def test_server_command_sets_load_format_and_merges_loader_config():
    cmd = server_command("M", ["/p/a.patch", "/p/b.patch"],
                         ["--port", "8000", "--model-loader-extra-config", '{"enable_multithread_load": true}'])
    assert cmd[1:7] == ["-m", SERVER_MODULE, "--model", "M", "--load-format", "memit"]
    assert json.loads(cmd[cmd.index("--model-loader-extra-config") + 1]) == {
        "enable_multithread_load": True, "patches": ["/p/a.patch", "/p/b.patch"]}
    assert cmd[-2:] == ["--port", "8000"]
    eq_form = server_command("M", ["a"], ['--model-loader-extra-config={"num_threads": 2}'])
    assert json.loads(eq_form[eq_form.index("--model-loader-extra-config") + 1]) == {"num_threads": 2, "patches": ["a"]}
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
    assert "memit_vllm" in env and "lora_filesystem_resolver" in env  # vLLM's own general plugin
    assert server_env({"VLLM_PLUGINS": "other"})["VLLM_PLUGINS"] == "other,memit_vllm"
    assert server_env({"VLLM_PLUGINS": "memit_vllm"})["VLLM_PLUGINS"] == "memit_vllm"


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
