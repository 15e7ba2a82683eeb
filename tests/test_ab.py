"""`memit-vllm ab` without vLLM: arm parsing, regression files, the agreement it reports, and the scorer's
requests against a stub OpenAI server."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from memit_vllm.ab import _agreement, parse_arm
from memit_vllm.core.records import read_prompts
from memit_vllm.errors import MemitError
from memit_vllm.evaluate.served import ServedScorer, ServerError


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
    assert read_prompts(f, "--regression") == [{"prompt": "The capital of France is", "answer": None},
                                  {"prompt": "2 + 2 =", "answer": "4"}]
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "answer": "c"}\n')
    assert [x["prompt"] for x in read_prompts(f, "--regression")] == ["a", "b"]
    for bad, message in [("[]", "holds no prompts"), ('[{"text": "x"}]', "item 0 is not a prompt"),
                         ("{not json", "neither JSON nor JSONL")]:
        f.write_text(bad)
        with pytest.raises(MemitError, match=message):
            read_prompts(f, "--regression")


def test_agreement_uses_the_given_answer_else_arm_a():
    prompts = [{"prompt": "p", "answer": "Paris"}, {"prompt": "q", "answer": None}, {"prompt": "r", "answer": None}]
    control = [" Lyon", " Rome", " yes"]
    assert _agreement([" Paris, France", " Rome ", " no"], prompts, control) == pytest.approx(2 / 3)
    assert _agreement(control, prompts, control) == pytest.approx(2 / 3)  # A misses the given answer


def _choice(index: int, ids: list[int], body: dict) -> dict:
    """A token-id prompt: greedy -> its ids reversed, the first one at log 0.6 over log 0.1; echo -> per
    position the top-k candidates 1..k at logprob -rank, plus the actual token at -50."""
    if body.get("echo"):
        tops = [None] + [{f"token_id:{t}": -float(t) for t in range(1, body["logprobs"] + 1)} | {f"token_id:{i}": -50.0}
                         for i in ids[1:]]
        return {"index": index, "logprobs": {"top_logprobs": tops, "token_logprobs": [None] + [-50.0] * (len(ids) - 1)}}
    first = {f"token_id:{ids[-1]}": math.log(0.6), "token_id:0": math.log(0.1)}
    return {"index": index, "token_ids": ids[::-1], "logprobs": {"top_logprobs": [first]}}


class _CharTokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(ch) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


class _StubServer(BaseHTTPRequestHandler):
    """/v1/models and /v1/completions (text prompts: reversed; token ids: `_choice`); `status` answers
    /memit/patches."""

    status = 404
    prompts: list = []  # every completion prompt received (text or token ids)

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._answer(200, {"data": [{"id": "base"}]})
        self._answer(self.status, {"error": "no"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.prompts.extend(body["prompt"])
        choices = [{"index": i, "text": p[::-1]} if isinstance(p, str) else _choice(i, p, body)
                   for i, p in enumerate(body["prompt"])]
        self._answer(200, {"choices": choices[::-1]})

    def log_message(self, *args):
        pass


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(_StubServer, "prompts", [])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_plain_server_serves_no_patches_and_other_errors_carry_their_status(stub, monkeypatch):
    scorer = ServedScorer(stub, tokenizer=None)
    assert scorer.model == "base" and scorer.served_patch_ids() == []
    assert scorer.complete(["ab", "cd"], 4) == ["ba", "dc"]  # in prompt order, whatever the answer's order
    monkeypatch.setattr(_StubServer, "status", 500)
    with pytest.raises(ServerError, match="/memit/patches answered 500") as e:
        scorer.served_patch_ids()
    assert e.value.status == 500


def test_greedy_and_top_logprobs_requests(stub):
    scorer = ServedScorer(stub, tokenizer=_CharTokenizer())
    first, second = scorer.greedy(["ab", "xyz"], 4)  # in prompt order, whatever the answer's order
    assert (first.tokens, first.text, second.text) == ((ord("b"), ord("a")), "ba", "zyx")
    assert first.margin == pytest.approx(0.5)
    (tops,) = scorer.top_logprobs([[7, 100, 200]], k=3)
    assert tops == [{1: -1.0, 2: -2.0, 3: -3.0}] * 2  # one per predicted token; the echoed actual one dropped


@pytest.mark.parametrize("target, new, old", [("alt", "unmanned aircraft", "uniform"),
                                              ("answers", "uniform", "unmanned aircraft")])
def test_zsre_target_picks_what_both_arms_are_scored_on(stub, smollm2, data_dir, tmp_path, target, new, old):
    """`ab --zsre-target` as in eval and make-patch: the first zsRE record edits UniFirst's product
    from "uniform" (answers[0]) to "unmanned aircraft" (alt); the arms are asked for the chosen one."""
    from transformers import AutoTokenizer

    from memit_vllm.cli import main

    result = CliRunner().invoke(main, ["ab", "--a", stub, "--b", stub, "--edits",
                                       str(data_dir / "zsre" / "zsre_mend_train_1k.json"), "--n", "1",
                                       "--zsre-target", target, "--tokenizer", str(smollm2),
                                       "--json", str(tmp_path / "ab.json"), "--plot", str(tmp_path / "ab.png")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ab.json").read_text())["zsre_target"] == target
    tok = AutoTokenizer.from_pretrained(smollm2)
    asked = [p if isinstance(p, str) else tok.decode(p) for p in _StubServer.prompts]
    assert any(new in p for p in asked) and not any(old in p for p in asked)


def test_unrelated_count_asks_that_many_later_records(stub, smollm2, data_dir, tmp_path):
    """`ab --unrelated-count` as `eval --unrelated-count`: the edit prompts of that many records after the
    first --n are asked of both arms, and the table says how well a share of that many is known."""
    from transformers import AutoTokenizer

    from memit_vllm.cli import main

    data = data_dir / "counterfact" / "counterfact_500.json"
    records = json.loads(data.read_text())
    result = CliRunner().invoke(main, ["ab", "--a", stub, "--b", stub, "--edits", str(data), "--n", "1",
                                       "--unrelated-count", "3", "--tokenizer", str(smollm2),
                                       "--json", str(tmp_path / "ab.json"), "--plot", str(tmp_path / "ab.png")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ab.json").read_text())["generation"]["unrelated_prompts"] == 3
    assert "3 unrelated prompts" in result.output and "+-57 points (95%)" in result.output
    later = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records[1:5]]
    tok = AutoTokenizer.from_pretrained(smollm2)
    asked = [p if isinstance(p, str) else tok.decode(p) for p in _StubServer.prompts]
    assert all(p in asked for p in later[:3]) and later[3] not in asked
