"""`memit-vllm ab` without servers: arm parsing, regression files, and the agreement it reports."""

from __future__ import annotations

import pytest

from memit_vllm.ab import _agreement, parse_arm, read_regression
from memit_vllm.errors import MemitError


@pytest.mark.parametrize("spec, url, model", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000", None),
    ("http://127.0.0.1:8000:edited", "http://127.0.0.1:8000", "edited"),
    ("http://host:8000:/models/smollm2", "http://host:8000", "/models/smollm2"),
    ("https://gateway", "https://gateway", None),
])
def test_arm_is_url_and_optional_model(spec, url, model):
    arm = parse_arm("A", spec)
    assert (arm.url, arm.model) == (url, model)


def test_arm_without_scheme_is_refused():
    with pytest.raises(MemitError, match=r"--a '127.0.0.1:8000': expected http\(s\)://HOST:PORT\[:MODEL\]"):
        parse_arm("A", "127.0.0.1:8000")


def test_regression_file_forms(tmp_path):
    f = tmp_path / "r.json"
    f.write_text('["The capital of France is", {"prompt": "2 + 2 =", "answer": "4"}]')
    assert read_regression(f) == [{"prompt": "The capital of France is", "answer": None},
                                  {"prompt": "2 + 2 =", "answer": "4"}]
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "answer": "c"}\n')
    assert [x["prompt"] for x in read_regression(f)] == ["a", "b"]
    for bad, message in [("[]", "holds no prompts"), ('[{"text": "x"}]', "item 0 is not a prompt"),
                         ("{not json", "neither JSON nor JSONL")]:
        f.write_text(bad)
        with pytest.raises(MemitError, match=message):
            read_regression(f)


def test_agreement_uses_the_given_answer_else_arm_a():
    prompts = [{"prompt": "p", "answer": "Paris"}, {"prompt": "q", "answer": None}, {"prompt": "r", "answer": None}]
    control = [" Lyon", " Rome", " yes"]
    assert _agreement([" Paris, France", " Rome ", " no"], prompts, control) == pytest.approx(2 / 3)
    assert _agreement(control, prompts, control) == pytest.approx(2 / 3)  # A misses the given answer
