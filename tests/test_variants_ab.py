"""A/B on SmolLM2 with real servers: one server with the base and a LoRA variant of a real patch
(`memit-vllm serve --memit-variant`), one server with the same patch merged, `memit-vllm ab`
comparing them, and `eval`'s two backends agreeing on the merged one.

Two engines for the module: the variant server and the merged-patch server.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memit_vllm.core.contract import STACK_HEADER, VARIANT_HEADER
from memit_vllm.patch import load_patch
from memit_vllm.patch.tools import apply_patches
from memit_vllm.testing.server import BASE_ARGS, hf_greedy, memit_serve_cmd, vllm_server
from memit_vllm.testing.synthetic import synthetic_patch
from test_plugin_serve import completion_headers, metrics_text

pytestmark = pytest.mark.vllm

PROMPTS = ["Angola is located in", "Delta Goodrem, that originated in", "Google Patents, a product developed by",
           "The capital of France is", "The largest ocean on Earth is the", "Water is made of hydrogen and"]
TOKENS = 8
# examples/facts.json in the EasyEdit CounterFact layout, with a paraphrase and a neighbour each.
EDITS = [
    {"case_id": 0, "prompt": "Angola is located in", "subject": "Angola", "target_new": "Antarctica",
     "ground_truth": "Africa", "rephrase_prompt": "The country of Angola lies in",
     "locality_prompt": "Kenya is located in", "locality_ground_truth": "Africa"},
    {"case_id": 1, "prompt": "Delta Goodrem, that originated in", "subject": "Delta Goodrem", "target_new": "India",
     "ground_truth": "Australia", "rephrase_prompt": "The singer Delta Goodrem comes from",
     "locality_prompt": "Kylie Minogue, that originated in", "locality_ground_truth": "Australia"},
    {"case_id": 2, "prompt": "Google Patents, a product developed by", "subject": "Google Patents",
     "target_new": "Microsoft", "ground_truth": "Google", "rephrase_prompt": "Google Patents is made by",
     "locality_prompt": "Google Maps, a product developed by", "locality_ground_truth": "Google"},
]


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memit_vllm", *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def variant_server(smollm2, facts_patch, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "variants.log"
    cmd = [sys.executable, "-m", "memit_vllm", "serve", str(smollm2), "--memit-variant", f"edited={facts_patch}",
           "--served-model-name", "base", *BASE_ARGS]
    with vllm_server(cmd, "base", log) as s:
        yield s


@pytest.fixture(scope="module")
def merged_server(smollm2, facts_patch, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "merged.log"
    with vllm_server(memit_serve_cmd(smollm2, facts_patch), str(smollm2), log) as s:
        yield s


def test_base_and_variant_from_one_server(variant_server, smollm2, facts_patch, tmp_path):
    models = {m["id"] for m in variant_server.get("/v1/models")["data"]}
    assert models == {"base", "edited"}
    assert variant_server.greedy(PROMPTS, TOKENS, "base") == hf_greedy(smollm2, PROMPTS, TOKENS)
    merged = apply_patches([load_patch(facts_patch)], smollm2, tmp_path / "merged")
    edited = variant_server.greedy(PROMPTS, TOKENS, "edited")
    assert edited == hf_greedy(merged, PROMPTS, TOKENS)
    assert edited[:3] != variant_server.greedy(PROMPTS, TOKENS, "base")[:3]
    # Every answer names what produced it, so gateway logs alone attribute the split.
    pid = load_patch(facts_patch).patch_id
    headers = completion_headers(variant_server, "edited")
    assert (headers[VARIANT_HEADER], headers[STACK_HEADER]) == (f"edited={pid}", "none")
    headers = completion_headers(variant_server, "base")
    assert VARIANT_HEADER not in headers and headers[STACK_HEADER] == "none"
    assert f'memit_active_patch_info{{id="{pid}",name="facts",position="0",variant="edited",version="1"}} 1.0' in (
        metrics_text(variant_server))


def test_variant_refusals(smollm2, tiny_models, tmp_path):
    gpt2 = synthetic_patch(tiny_models["gpt2"], layers=(1,), name="g").save(tmp_path / "gpt2.patch")
    r = cli("serve", tiny_models["gpt2"], "--memit-variant", f"v={gpt2}")
    assert r.returncode == 2 and "vLLM serves down_proj LoRA only for LlamaForCausalLM" in r.stderr, r.stderr
    foreign = synthetic_patch(tiny_models["llama"], layers=(1,), name="tiny").save(tmp_path / "tiny.patch")
    r = cli("serve", smollm2, "--memit-variant", f"v={foreign}")
    assert r.returncode == 2 and "differs from the base the patch was made for" in r.stderr, r.stderr
    r = cli("serve", smollm2, "--memit-variant", str(foreign))
    assert r.returncode == 2 and "expected NAME=PATCH_FILE" in r.stderr, r.stderr


def test_ab_between_two_servers(variant_server, merged_server, facts_patch, tmp_path):
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps(EDITS))
    regression = tmp_path / "regression.jsonl"
    regression.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[3:]) + "\n")
    r = cli("ab", "--a", f"{variant_server.url}:base", "--b", merged_server.url, "--edits", edits,
            "--regression", regression, "--json", tmp_path / "ab.json", "--plot", tmp_path / "ab.png")
    assert r.returncode == 0, r.stderr
    variant = cli("ab", "--a", f"{variant_server.url}:base", "--b", f"{variant_server.url}:edited",
                  "--edits", edits, "--json", "-", "--plot", tmp_path / "variant.png")
    result = json.loads((tmp_path / "ab.json").read_text())
    a, b = result["A"]["metrics"], result["B"]["metrics"]
    assert result["B"]["patches"] == [load_patch(facts_patch).patch_id] and result["A"]["patches"] == []
    assert b["ES"] == 1.0 > a["ES"]  # the edit prefers every new fact, the base not
    assert b["rewrite_hit"] == 1.0 > a["rewrite_hit"]
    # Agreement with arm A's answers (the reference), checked against the two servers' own completions.
    a_answers = variant_server.complete(PROMPTS[3:], max_tokens=16)
    b_answers = merged_server.complete(PROMPTS[3:], max_tokens=16)
    assert b["regression_agreement"] == sum(x.strip() == y.strip() for x, y in zip(a_answers, b_answers)) / 3
    for arm in ("A", "B"):
        assert set(result[arm]["latency"]) >= {"p50_ms", "p90_ms", "p99_ms"}
        assert result[arm]["latency"]["requests"] == len(EDITS) * 2 + len(PROMPTS) - 3
    for line in ("ES", "PS", "NS", "rewrite_hit", "regression_agreement", "latency p99 (ms)"):
        assert any(row.startswith(line) for row in r.stdout.splitlines()), (line, r.stdout)
    assert (tmp_path / "ab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The LoRA variant and the merged patch are the same model: same scores through the API.
    assert variant.returncode == 0, variant.stderr
    assert json.loads(variant.stdout)["B"]["patches"] == result["B"]["patches"]
    lora = json.loads(variant.stdout)["B"]["metrics"]
    assert all(abs(lora[k] - b[k]) < 1e-3 for k in ("ES", "PS", "NS", "ES_magnitude", "PS_magnitude", "NS_magnitude"))


def test_eval_backends_agree_on_smollm2(merged_server, smollm2, facts_patch, data_dir):
    """`eval`'s transformers backend (patch merged in memory) and its vLLM backend (the served patch)
    give the same CounterFact scores for the same patch."""
    from memit_vllm.evaluate.run import evaluate

    data = data_dir / "counterfact" / "counterfact_500.json"
    hf = evaluate(str(smollm2), data, [facts_patch], n=4)
    served = evaluate(str(smollm2), data, [facts_patch], n=4, backend="vllm", server=merged_server.url)
    assert set(served["after"]) == set(hf["after"])
    for k, v in hf["after"].items():
        assert abs(served["after"][k] - v) < 1e-3, (k, served["after"][k], v)
