"""`memit-vllm eval --backend vllm` agrees with the transformers backend: teacher-forced scores within 1e-3
(issue 7), and with `--generate` the same greedy tokens, so the same generated metrics (issue 18).

One real engine for the module: SmolLM2 served by `memit-vllm serve` as the unedited model ("base") and
the real MEMIT patch of examples/facts.json as a variant ("edited"), so one server gives both columns.
"""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from memit_vllm.checkpoint import Checkpoint
from memit_vllm.cli import main
from memit_vllm.core.records import read_dataset
from memit_vllm.evaluate.generation import HELDOUT_DEFAULT, generation_task, served_kl, unrelated_prompts
from memit_vllm.evaluate.patching import load_model, merge_into_model, swapped
from memit_vllm.evaluate.run import evaluate
from memit_vllm.evaluate.scoring import TransformersScorer
from memit_vllm.evaluate.served import ServedScorer
from memit_vllm.patch import load_patch
from memit_vllm.testing.server import BASE_ARGS, vllm_server

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(smollm2, facts_patch, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    cmd = [sys.executable, "-m", "memit_vllm", "serve", str(smollm2), "--served-model-name", "base",
           "--memit-variant", f"edited={facts_patch}", *BASE_ARGS]
    with vllm_server(cmd, "base", log) as s:
        yield s


def run_json(*args) -> dict:
    result = CliRunner().invoke(main, ["eval", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("data,extra", [("counterfact/counterfact_500.json", ["--n", 1, "--fluency"]),
                                        ("counterfact/counterfact_edit_10k.json", ["--n", 4]),
                                        ("zsre/zsre_mend_train_1k.json", ["--n", 4])])
def test_backends_agree(smollm2, facts_patch, server, data_dir, data, extra):
    common = ["--model", smollm2, "--patch", facts_patch, "--data", data_dir / data, *extra]
    local = run_json(*common)
    served = run_json(*common, "--backend", "vllm", "--server", f"{server.url}:edited")
    assert "before" not in served and served["after_server"] == f"{server.url}:edited"
    assert served["patches"] == local["patches"]
    for name, value in local["after"].items():
        assert served["after"][name] == pytest.approx(value, abs=1e-3), name


def test_server_with_other_patches_is_refused(smollm2, server, data_dir):
    result = CliRunner().invoke(main, ["eval", "--model", str(smollm2), "--backend", "vllm",
                                       "--server", f"{server.url}:edited", "--data",
                                       str(data_dir / "zsre" / "zsre_mend_train_1k.json"), "--n", "1"])
    assert result.exit_code == 2 and "serves patches ['mp1-" in result.stderr


@pytest.fixture(scope="module")
def small_inputs(data_dir, tmp_path_factory):
    """20 unrelated prompts and 10 held-out texts: the defaults' kinds, fewer (CPU time)."""
    out = tmp_path_factory.mktemp("generate")
    data = data_dir / "counterfact" / "counterfact_500.json"
    fmt, records = read_dataset(data, 3)
    prompts, _ = unrelated_prompts(data, fmt, records)
    (out / "unrelated.json").write_text(json.dumps(prompts[:20]))
    lines = HELDOUT_DEFAULT.read_text().splitlines()[-10:]
    (out / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    return data, out / "unrelated.json", out / "heldout.jsonl"


def test_greedy_tokens_are_the_same_on_both_backends(smollm2, facts_patch, server, small_inputs):
    """Every completion `--generate` asks for, token for token, unedited and edited; the KL estimate
    from the server's top-20 lists as from the full distributions."""
    data, unrelated, heldout = small_inputs
    ckpt = Checkpoint(smollm2)
    model, tok = load_model(ckpt)
    fmt, records = read_dataset(data, 3)
    prompts = json.loads(unrelated.read_text())
    task = generation_task(tok, fmt, records, prompts, "test", heldout)
    local = TransformersScorer(model, tok, progress=False)
    base, edited = (ServedScorer(server.url, tok, model=m) for m in ("base", "edited"))

    def assert_same(mine, served):
        assert [c.tokens for c in mine.hits + mine.kept] == [c.tokens for c in served.hits + served.kept]
        assert [c.text for c in mine.kept] == [c.text for c in served.kept]
        assert all(abs(a.margin - b.margin) < 1e-3 for a, b in zip(mine.kept, served.kept))

    assert_same(task.complete(local), task.complete(base))
    unedited = merge_into_model(model, ckpt, [load_patch(facts_patch)])
    assert_same(task.complete(local), task.complete(edited))
    _, estimate = local.heldout_kl(task.heldout, lambda: swapped(model, unedited))
    assert served_kl(base, edited, task.heldout) == pytest.approx(estimate, abs=1e-3)


def test_generate_backends_agree(smollm2, facts_patch, server, small_inputs):
    data, unrelated, heldout = small_inputs
    options = dict(n=3, generate=True, unrelated=unrelated, heldout=heldout)
    local = evaluate(str(smollm2), data, [facts_patch], **options)
    served = evaluate(str(smollm2), data, [facts_patch], backend="vllm", server=f"{server.url}:edited",
                      base_server=f"{server.url}:base", **options)
    assert served["before_server"] == f"{server.url}:base"
    assert local["after"]["rewrite_hit"] > local["before"]["rewrite_hit"]  # record 0 is one of the patch's facts
    assert "heldout_kl" not in served["after"]  # a server returns top-k lists only
    for phase in ("before", "after"):
        for name in set(local[phase]) - {"heldout_kl"}:
            assert served[phase][name] == pytest.approx(local[phase][name], abs=1e-3, nan_ok=True), (phase, name)
    assert served["generation"]["unrelated_confident"] == local["generation"]["unrelated_confident"]
