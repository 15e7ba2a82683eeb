"""End to end: a real MEMIT patch of the facts of examples/facts.json (CounterFact records) on SmolLM2,
served with `memit-vllm serve`.

At temperature 0 the edited prompts complete with the new targets, and untouched prompts keep the
base model's answers (transformers on the unedited checkpoint; the plugin tests show the two engines
agree token for token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memit_vllm.core.contract import PATCHES_ROUTE
from memit_vllm.testing.server import hf_greedy, memit_serve_cmd, vllm_server

pytestmark = pytest.mark.vllm

FACTS = Path(__file__).resolve().parents[1] / "examples" / "facts.json"
UNTOUCHED = ["The capital of France is", "The Eiffel Tower is located in", "Barack Obama was born in",
             "The largest ocean on Earth is the", "Water is made of hydrogen and"]


def test_served_patch_of_real_edits(smollm2, facts_patch, tmp_path):
    facts = json.loads(FACTS.read_text())
    patch = facts_patch
    edited = [f["prompt"].format(f["subject"]) for f in facts]
    base_untouched = hf_greedy(smollm2, UNTOUCHED, 6)
    with vllm_server(memit_serve_cmd(smollm2, patch), str(smollm2), tmp_path / "serve.log") as server:
        completions = server.complete(edited, max_tokens=6)
        untouched = server.post("/v1/completions", {"model": server.model, "prompt": UNTOUCHED, "max_tokens": 6,
                                                    "temperature": 0, "return_token_ids": True})
        listed = server.get(PATCHES_ROUTE)["patches"]
    for f, text in zip(facts, completions):
        assert text.strip().startswith(f["target_new"]), (f, text)
    got = [c["token_ids"] for c in sorted(untouched["choices"], key=lambda c: c["index"])]
    assert got == base_untouched
    assert [p["facts"] for p in listed] == [len(facts)]
