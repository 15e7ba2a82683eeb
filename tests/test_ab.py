"""`memit-vllm ab` without vLLM: arm parsing, regression files, the agreement it reports, and the scorer's
requests against a stub OpenAI server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from memit_vllm.ab import _agreement, parse_arm, read_regression
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


class _StubServer(BaseHTTPRequestHandler):
    """/v1/models and /v1/completions (echoes each prompt reversed); `status` answers /memit/patches."""

    status = 404

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
        prompts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompt"]
        self._answer(200, {"choices": [{"index": i, "text": p[::-1]} for i, p in reversed(list(enumerate(prompts)))]})

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
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
