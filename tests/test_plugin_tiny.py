"""The `memit` load format on other layouts: tiny GPT-2 (Conv1D, transposed by vLLM's load_weights) through
the stock server flags (`--load-format memit --model-loader-extra-config`), and tiny Qwen2 through the
offline `LLM` of examples/offline_llm.py. Both must match transformers on the HF-merged checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY
from memit_vllm.patch import load_patch
from memit_vllm.patch.tools import apply_patches
from memit_vllm.testing.server import VLLM_ENV, api_server_cmd, hf_greedy, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "The weather today"]
TOKENS = 8


def hf_prompt_logprobs(model_dir, prompts) -> list[list[float]]:
    """log P(token i | tokens < i) for every prompt token after the first, teacher forced."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        out.append(logp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return out


def test_tiny_gpt2_conv1d_served_with_stock_flags_matches_hf_merged(tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    patch = synthetic_patch(model, layers=(1, 2), rank=2, seed=3, scale=1.0, name="gpt2").save(tmp_path / "g.patch")
    cmd = api_server_cmd(model, "--load-format", LOAD_FORMAT,
                         "--model-loader-extra-config", json.dumps({PATCHES_KEY: [str(patch)]}))
    with vllm_server(cmd, str(model), tmp_path / "serve.log") as server:
        tokens = server.greedy(PROMPTS, TOKENS)
        out = server.post("/v1/completions", {"model": server.model, "prompt": PROMPTS, "max_tokens": 1,
                                              "temperature": 0, "prompt_logprobs": 0})
    served_logprobs = [[next(iter(d.values()))["logprob"] for d in c["prompt_logprobs"][1:]]
                       for c in sorted(out["choices"], key=lambda c: c["index"])]
    merged = apply_patches([load_patch(patch)], model, tmp_path / "merged")
    want = hf_prompt_logprobs(merged, PROMPTS)
    for got, exp in zip(served_logprobs, want):
        assert got == pytest.approx(exp, abs=1e-4)
    base = hf_prompt_logprobs(model, PROMPTS)
    assert max(abs(a - b) for g, e in zip(base, want) for a, b in zip(g, e)) > 1e-2, "the patch should matter"
    assert tokens == hf_greedy(merged, PROMPTS, TOKENS)


def test_tiny_qwen2_offline_llm_matches_hf_merged(tiny_models, tmp_path):
    model = tiny_models["qwen2"]
    patch = synthetic_patch(model, layers=(1, 2), rank=2, seed=4, scale=3.0, name="qwen2").save(tmp_path / "q.patch")
    prompt_args = [a for p in PROMPTS for a in ("--prompt", p)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "offline_llm.py"), str(model), str(patch), *prompt_args,
         "--max-tokens", str(TOKENS), "--dtype", "float32"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **VLLM_ENV})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == PROMPTS
    assert "memit patch" in proc.stderr + proc.stdout
    merged = apply_patches([load_patch(patch)], model, tmp_path / "merged")
    tokens = [line["token_ids"] for line in lines]
    assert tokens == hf_greedy(merged, PROMPTS, TOKENS)
    assert tokens != hf_greedy(model, PROMPTS, TOKENS), "the patch should change some greedy completions"
