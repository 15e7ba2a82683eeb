"""End to end: real MEMIT patches on SmolLM2 served with `memit-vllm serve`: the facts of
examples/facts.json (CounterFact records), and a second patch made on top of it (`--on`, a lineage).

At temperature 0 the edited prompts of both patches complete with their new targets, the server gives
the same tokens as transformers on the checkpoint with the lineage merged, and untouched prompts keep
the base model's answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memit_vllm import make_patch
from memit_vllm.core.contract import PATCHES_ROUTE
from memit_vllm.patch import load_patch
from memit_vllm.patch.tools import apply_patches
from memit_vllm.testing.server import hf_greedy, memit_serve_cmd, vllm_server

pytestmark = pytest.mark.vllm

FACTS = Path(__file__).resolve().parents[1] / "examples" / "facts.json"
CHILD_FACTS = [  # CounterFact cases 10626 and 3169 (records 90 and 40 of counterfact_500.json)
    {"prompt": "The mother tongue of {} is", "subject": "Valentin Conrart", "target_new": "English",
     "target_true": "French"},
    {"prompt": "{} is a citizen of", "subject": "Jens Evensen", "target_new": "Ireland", "target_true": "Norway"}]
# Untouched prompts the unedited model answers (no tie at the first token: "Barack Obama was born in", ' the'
# and ' ' at 0.096 each, flipped under a 2-fact child patch; near-ties are what any edit moves first,
# docs/hyperparameters.md "Drift on unrelated prompts").
UNTOUCHED = ["The capital of France is", "The Eiffel Tower is located in", "The capital of Japan is",
             "The largest ocean on Earth is the", "Water is made of hydrogen and"]


@pytest.fixture(scope="module")
def child_patch(smollm2, facts_patch, data_dir, tmp_path_factory) -> Path:
    """Two more facts made on top of the facts patch (the editor loads base + facts patch)."""
    out = tmp_path_factory.mktemp("child") / "child.patch"
    return make_patch(smollm2, CHILD_FACTS, stats_corpus=str(data_dir / "corpus" / "smollm2_self_2k.jsonl"),
                      on=[facts_patch], name="child", version="1", progress=False).save(out)


def prompt_of(fact: dict) -> str:
    return fact["prompt"].format(fact["subject"])


def test_served_lineage_of_real_edits(smollm2, facts_patch, child_patch, tmp_path):
    facts = json.loads(FACTS.read_text()) + CHILD_FACTS
    edited = [prompt_of(f) for f in facts]
    merged = apply_patches([load_patch(facts_patch), load_patch(child_patch)], smollm2, tmp_path / "merged")
    want = hf_greedy(merged, edited + UNTOUCHED, 6)
    base_untouched = hf_greedy(smollm2, UNTOUCHED, 6)
    with vllm_server(memit_serve_cmd(smollm2, facts_patch, child_patch), str(smollm2),
                     tmp_path / "serve.log") as server:
        completions = server.complete(edited, max_tokens=6)
        served = server.greedy(edited + UNTOUCHED, 6)
        listed = server.get(PATCHES_ROUTE)["patches"]
    for f, text in zip(facts, completions):  # the first patch's facts held, the child's were added
        assert text.strip().startswith(f["target_new"]), (f, text)
    assert served == want  # vLLM serves what transformers computes on the merged lineage
    assert served[len(edited):] == base_untouched
    assert [p["facts"] for p in listed] == [3, 2]
