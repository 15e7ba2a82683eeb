"""MEMIT on the real default model: 10 CounterFact edits take, generalise, and leave neighbours alone."""

from memit_vllm import make_patch
from memit_vllm.editor import load_requests
from memit_vllm.evaluate.run import evaluate


def test_ten_counterfact_edits_on_smollm2(smollm2, data_dir, tmp_path):
    data = data_dir / "counterfact" / "counterfact_500.json"
    patch = make_patch(smollm2, load_requests(data, limit=10),
                       stats_corpus=str(data_dir / "corpus" / "smollm2_self_2k.jsonl"), progress=False)
    assert patch.hparams["source"] == "measured, SmolLM2-135M"
    result = evaluate(str(smollm2), data, [patch.save(tmp_path / "ten.patch")], n=10)
    before, after = result["before"], result["after"]
    assert after["ES"] == 1.0, after
    assert after["PS"] >= 0.8, after
    assert after["NS"] >= before["NS"] - 0.05, (before, after)
