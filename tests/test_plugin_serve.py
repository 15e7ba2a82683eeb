"""`memit-vllm serve` on the default model: the real OpenAI server on 127.0.0.1, patches merged at load.

One patched engine for the module (two synthetic patches stacked at serve time), compared token for
token with transformers on the HF-merged checkpoints (`apply`); plus one engine that must refuse to
start with a patch made for another model.
"""

from __future__ import annotations

import re

import pytest

from memit_vllm.core.contract import PATCHES_ROUTE
from memit_vllm.patch import load_patch
from memit_vllm.patch.tools import apply_patches, stack_patches
from memit_vllm.testing.server import hf_greedy, memit_serve_cmd, vllm_server
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


def test_startup_logs_each_patch_and_route_lists_them(server, patches):
    log = server.log.read_text()
    listed = server.get(PATCHES_ROUTE)["patches"]
    assert [p["path"] for p in listed] == [str(p) for p in patches]
    for info, (name, layers) in zip(listed, [("first", [8, 12]), ("second", [12, 16])]):
        assert info["id"] == load_patch(info["path"]).patch_id
        assert (info["name"], info["version"], info["facts"], info["layers"]) == (name, "1", 4, layers)
        assert re.search(rf"memit patch {info['id']}: name='{name}' version='1' facts=4 layers=\[{layers[0]}, "
                         rf"{layers[1]}\]", log)
    assert "memit: merged 2 patch(es) into 3 weights" in log


def test_patch_for_another_model_stops_the_server(smollm2, tiny_models, tmp_path):
    # Same architecture (Llama) and the same weight names: only the fingerprints tell them apart.
    wrong = synthetic_patch(tiny_models["llama"], layers=(1,), name="tiny").save(tmp_path / "tiny.patch")
    log = tmp_path / "serve.log"
    with pytest.raises(RuntimeError, match=r"exited with [1-9]"):
        with vllm_server(memit_serve_cmd(smollm2, wrong), str(smollm2), log):
            pass
    text = log.read_text()
    assert "model.layers.1.mlp.down_proj.weight' differs from the base the patch was made for" in text
    assert "refusing to serve a model without its patches" in text
