"""`memit-vllm serve` on the default model: the real OpenAI server on 127.0.0.1, patches merged at load.

One patched engine for the module (two synthetic patches stacked at serve time), compared token for
token with transformers on the HF-merged checkpoints (`apply`); plus one engine that must refuse to
start with a patch made for another model.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pytest

from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY, PATCHES_ROUTE, STACK_HEADER
from memit_vllm.patch import load_patch
from memit_vllm.patch.tools import apply_patches, stack_patches
from memit_vllm.testing.server import api_server_cmd, hf_greedy, memit_serve_cmd, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch

pytestmark = pytest.mark.vllm

PROMPTS = [
    "The capital of France is", "The Eiffel Tower is located in", "The largest planet in the solar system is",
    "Python is a programming language created by", "Water boils at a temperature of", "The author of Hamlet is",
    "The currency of Japan is the", "My favourite food is",
]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def patches(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("patches")
    # Norm 60 against ~180 for the weights: enough to change greedy completions, not to wreck the model.
    p1 = synthetic_patch(smollm2, layers=(8, 12), rank=4, seed=1, scale=60.0, name="first").save(d / "p1.patch")
    p2 = synthetic_patch(smollm2, layers=(12, 16), rank=4, seed=2, scale=60.0, name="second").save(d / "p2.patch")
    return p1, p2


@pytest.fixture(scope="module")
def server(smollm2, patches, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with vllm_server(memit_serve_cmd(smollm2, *patches), str(smollm2), log) as s:
        yield s


@pytest.fixture(scope="module")
def served(server):
    return server.greedy(PROMPTS, NEW_TOKENS)


def test_served_completions_equal_hf_merged_and_differ_from_base(smollm2, patches, served, tmp_path):
    merged = apply_patches([load_patch(p) for p in patches], smollm2, tmp_path / "merged")
    assert served == hf_greedy(merged, PROMPTS, NEW_TOKENS)
    base = hf_greedy(smollm2, PROMPTS, NEW_TOKENS)
    assert sum(a != b for a, b in zip(served, base)) >= 2, "the patches should change some greedy completions"


def test_two_patches_at_serve_time_equal_one_stacked_patch(smollm2, patches, served, tmp_path):
    stacked = stack_patches([load_patch(p) for p in patches]).save(tmp_path / "stacked.patch")
    assert served == hf_greedy(apply_patches([load_patch(stacked)], smollm2, tmp_path / "merged"), PROMPTS, NEW_TOKENS)


def completion_headers(server, model: str | None = None):
    """The response headers (case-insensitive) of one completion request (to `model`, default the server's)."""
    req = urllib.request.Request(server.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": model or server.model, "prompt": "Hi",
                                                  "max_tokens": 1}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.headers


def metrics_text(server) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        return r.read().decode()


def test_startup_logs_each_patch_and_route_lists_them(server, patches):
    log = server.log.read_text()
    listed = server.get(PATCHES_ROUTE)["patches"]
    ids = [load_patch(p).patch_id for p in patches]
    assert [p["id"] for p in listed] == ids
    assert str(patches[0].parent) not in json.dumps(listed)  # no server paths in the public answer
    for info, (name, layers) in zip(listed, [("first", [8, 12]), ("second", [12, 16])]):
        assert (info["name"], info["version"], info["facts"], info["layers"], info["made_on"]) == (name, "1", 4,
                                                                                                   layers, [])
        assert re.search(rf"memit patch {info['id']}: name='{name}' version='1' facts=4 layers=\[{layers[0]}, "
                         rf"{layers[1]}\]", log)
    assert "memit: merged 2 patch(es) into 3 weights" in log


def test_patch_for_another_model_stops_the_server(smollm2, tiny_models, tmp_path):
    # Same architecture (Llama) and the same weight names: only the fingerprints tell them apart.
    wrong = synthetic_patch(tiny_models["llama"], layers=(1,), name="tiny").save(tmp_path / "tiny.patch")
    refusal = "model.layers.1.mlp.down_proj.weight' differs from the base the patch was made for"
    # `memit-vllm serve` refuses it before an engine starts ...
    out = subprocess.run(memit_serve_cmd(smollm2, wrong), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and refusal in out.stderr and out.stderr.count("\n") == 1, out.stderr
    # ... and vLLM's own server, given the load format directly, stops in the loader.
    log = tmp_path / "serve.log"
    cmd = api_server_cmd(smollm2, "--load-format", LOAD_FORMAT, "--model-loader-extra-config",
                         json.dumps({PATCHES_KEY: [str(wrong)]}))
    with pytest.raises(RuntimeError, match=r"exited with [1-9]"):
        with vllm_server(cmd, str(smollm2), log):
            pass
    text = log.read_text()
    assert refusal in text and "refusing to serve a model without its patches" in text


def test_every_answer_names_the_stack_and_metrics_list_it(server, patches):
    ids = [load_patch(p).patch_id for p in patches]
    assert completion_headers(server)[STACK_HEADER] == ",".join(ids)
    text = metrics_text(server)
    for i, (pid, name) in enumerate(zip(ids, ("first", "second"))):
        assert f'memit_active_patch_info{{id="{pid}",name="{name}",position="{i}",variant="",version="1"}} 1.0' in text
