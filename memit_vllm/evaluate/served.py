"""Scoring through a served model's OpenAI-compatible API (vLLM), for `eval --backend vllm`.

The same token ids as the transformers backend go to /v1/completions as token-id prompts with
`echo` and `logprobs=1`, so the server returns every prompt token's log-probability and its top-1
token: NLL and top-1 accuracy follow without re-tokenizing on the server. Plain HTTP (urllib), no
vLLM import: the server is a separate process, e.g. `memit-vllm serve M --memit-patch P`.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from tqdm import tqdm

from ..core.contract import PATCHES_ROUTE
from ..errors import MemitError
from .metrics import KL_TOP_K, Completion
from .scoring import TargetScore, encode_pair, map_batched


class ServerError(MemitError):
    """The server answered with an HTTP error; `status` is its code (404: the route is not served)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def split_endpoint(flag: str, spec: str) -> tuple[str, str | None]:
    """`http://host:port[:MODEL]` as (url, model or None): a trailing `:X` is a model unless X is a port."""
    if not spec.startswith(("http://", "https://")):
        raise MemitError(f"{flag} {spec!r}: expected http(s)://HOST:PORT[:MODEL]")
    head, sep, tail = spec.rpartition(":")
    if sep and not tail.isdigit() and not tail.startswith("//") and head not in ("http", "https"):
        return head.rstrip("/"), tail
    return spec.rstrip("/"), None


def request_json(url: str, route: str, body: dict | None = None, timeout: float = 600) -> dict:
    """GET (no body) or POST a JSON request; any failure is one MemitError naming the server."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + route, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise ServerError(f"{url}{route} answered {e.code}: {e.read()[:300]!r}", e.code) from e
    except OSError as e:
        raise MemitError(f"cannot reach the server at {url} ({e}); is it running?") from e


class ServedScorer:
    """`model`: which of the server's models to score (a LoRA variant's name, say); default its first."""

    def __init__(self, url: str, tokenizer, batch_size: int = 16, progress: bool = False, timeout: float = 600,
                 model: str | None = None):
        self.url, self.tokenizer = url.rstrip("/"), tokenizer
        self.batch_size, self.progress, self.timeout = batch_size, progress, timeout
        served = [m["id"] for m in self._request("/v1/models")["data"]]
        if model is not None and model not in served:
            raise MemitError(f"{self.url} serves no model {model!r}; it serves {served}")
        self.model = model or served[0]

    def _request(self, route: str, body: dict | None = None) -> dict:
        return request_json(self.url, route, body, self.timeout)

    def served_patch_ids(self) -> list[str]:
        """Patch ids behind the scored model (GET /memit/patches): those the server merged, then the
        variant's own when the model is a `--memit-variant`; a plain vLLM server has none."""
        try:
            served = self._request(PATCHES_ROUTE)
        except ServerError as e:
            if e.status == 404:
                return []
            raise
        variant = served.get("variants", {}).get(self.model)
        return [p["id"] for p in served["patches"]] + ([variant] if variant else [])

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, file=sys.stderr, leave=False)

    def score(self, pairs: Sequence[tuple[str, str]], desc: str = "scoring") -> list[TargetScore]:
        return map_batched(pairs, self.batch_size, self._bar(len(set(pairs)), desc), self._score_batch)

    def _score_batch(self, pairs: list[tuple[str, str]]) -> list[TargetScore]:
        encoded = [encode_pair(self.tokenizer, p, t) for p, t in pairs]
        out = self._request("/v1/completions", {
            "model": self.model, "prompt": [p + t for p, t in encoded], "max_tokens": 0, "echo": True,
            "logprobs": 1, "temperature": 0, "return_tokens_as_token_ids": True})
        choices = sorted(out["choices"], key=lambda c: c["index"])
        return [_target_score(c["logprobs"], len(p), t) for c, (p, t) in zip(choices, encoded)]

    def complete(self, prompts: list[str], max_tokens: int) -> list[str]:
        """Greedy continuations (without their prompt) of the prompts, in one request."""
        out = self._request("/v1/completions", {"model": self.model, "prompt": prompts, "max_tokens": max_tokens,
                                                "temperature": 0})
        return [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 100, desc: str = "generating") -> list[str]:
        """Greedy continuations with their prompt, like the transformers backend."""
        def batch_texts(batch: list[str]) -> list[str]:
            return [p + text for p, text in zip(batch, self.complete(batch, max_new_tokens))]

        return map_batched(prompts, self.batch_size, self._bar(len(set(prompts)), desc), batch_texts)


    def greedy(self, prompts: Sequence[str], max_new_tokens: int, desc: str = "greedy") -> list[Completion]:
        """Greedy completions of the prompts' token ids (as the transformers backend feeds them): the
        generated ids (`return_token_ids`; an EOS that stops one is its last), their text decoded here,
        and the first token's top-2 margin from `logprobs=2`."""
        def batch_completions(batch: list[str]) -> list[Completion]:
            out = self._request("/v1/completions", {
                "model": self.model, "prompt": [self.tokenizer(p)["input_ids"] for p in batch],
                "max_tokens": max_new_tokens, "temperature": 0, "logprobs": 2, "return_token_ids": True,
                "return_tokens_as_token_ids": True})
            completions = []
            for c in sorted(out["choices"], key=lambda c: c["index"]):
                p1, p2 = sorted(map(math.exp, c["logprobs"]["top_logprobs"][0].values()), reverse=True)[:2]
                tokens = tuple(c["token_ids"])
                completions.append(Completion(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), p1 - p2))
            return completions

        return map_batched(prompts, self.batch_size, self._bar(len(set(prompts)), desc), batch_completions)

    def top_logprobs(self, texts: Sequence[list[int]], k: int = KL_TOP_K) -> list[list[dict[int, float]]]:
        """Per text (token ids), per position predicting token 1.. : the top-k next-token log-probabilities
        (token id -> logprob), from the echoed prompt logprobs. The echo adds the actual token where it is
        not among the top k; it is dropped, so every position holds exactly the k largest."""
        def batch_tops(batch: list[tuple[int, ...]]) -> list[list[dict[int, float]]]:
            out = self._request("/v1/completions", {
                "model": self.model, "prompt": [list(t) for t in batch], "max_tokens": 0, "echo": True,
                "logprobs": k, "temperature": 0, "return_tokens_as_token_ids": True})
            return [[{int(t.removeprefix("token_id:")): lp for t, lp in sorted(top.items(), key=lambda x: -x[1])[:k]}
                     for top in c["logprobs"]["top_logprobs"][1:]]
                    for c in sorted(out["choices"], key=lambda c: c["index"])]

        return map_batched([tuple(t) for t in texts], self.batch_size, self._bar(len(texts), "held-out logprobs"),
                           batch_tops)


def _target_score(logprobs: dict, prompt_len: int, target: list[int]) -> TargetScore:
    """Entry j of the echoed logprobs is token j's log-probability and the top-1 candidates before it."""
    span = range(prompt_len, prompt_len + len(target))
    nll = -sum(logprobs["token_logprobs"][j] for j in span) / len(target)
    hits = sum(max(logprobs["top_logprobs"][j].items(), key=lambda kv: kv[1])[0] == f"token_id:{t}"
               for j, t in zip(span, target))
    return TargetScore(nll=nll, acc=hits / len(target))
