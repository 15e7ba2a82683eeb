"""The MEMIT paper's metrics (README "Evaluation"), as pure functions of per-prompt NLLs and accuracies.

A CounterFact comparison holds the mean per-token NLLs (new, true) of the two targets after one
prompt; P(new) > P(true) means nll_new < nll_true. Scores and magnitudes average per record first,
then over records (the MEMIT code's aggregation), so every record weighs the same.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

# Metric names in report order, with what they mean (used by the table, JSON and chart).
COUNTERFACT_METRICS = {
    "S": "harmonic mean of ES, PS, NS",
    "ES": "efficacy: P(new) > P(true) on the rewrite prompt",
    "PS": "paraphrase: P(new) > P(true) on paraphrases",
    "NS": "neighborhood: P(true) > P(new) on neighbours",
    "ES_magnitude": "mean P(new) - P(true), rewrite prompt",
    "PS_magnitude": "mean P(new) - P(true), paraphrases",
    "NS_magnitude": "mean P(true) - P(new), neighbours",
    "GE": "generation entropy (2/3 bigram, 4/3 trigram)",
}
ZSRE_METRICS = {
    "efficacy": "token top-1 accuracy of the target on src",
    "generalization": "token top-1 accuracy of the target on rephrase",
    "specificity": "token top-1 accuracy of loc_ans on loc",
}

Comparison = tuple[float, float]  # (nll_new, nll_true)


@dataclass(frozen=True)
class CounterFactScores:
    """One record's comparisons, and its generation texts when fluency is measured."""

    rewrite: Comparison
    paraphrase: list[Comparison]
    neighborhood: list[Comparison]
    generations: list[str] | None = None


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def harmonic_mean(xs: Sequence[float]) -> float:
    return 0.0 if any(x <= 0 for x in xs) else len(xs) / sum(1 / x for x in xs)


def _new_wins(c: Comparison) -> float:
    return float(c[0] < c[1])


def _new_margin(c: Comparison) -> float:
    return math.exp(-c[0]) - math.exp(-c[1])


def counterfact_metrics(records: Sequence[CounterFactScores]) -> dict[str, float]:
    def per_record(select, f):
        return _mean([_mean([f(c) for c in select(r)]) for r in records if select(r)])

    out = {
        "ES": per_record(lambda r: [r.rewrite], _new_wins),
        "PS": per_record(lambda r: r.paraphrase, _new_wins),
        "NS": per_record(lambda r: r.neighborhood, lambda c: float(c[1] < c[0])),
        "ES_magnitude": per_record(lambda r: [r.rewrite], _new_margin),
        "PS_magnitude": per_record(lambda r: r.paraphrase, _new_margin),
        "NS_magnitude": per_record(lambda r: r.neighborhood, lambda c: -_new_margin(c)),
    }
    out = {"S": harmonic_mean([out["ES"], out["PS"], out["NS"]]), **out}
    if all(r.generations for r in records):
        out["GE"] = _mean([_mean([ngram_entropy(t) for t in r.generations]) for r in records])
    return out


def zsre_metrics(src_acc: Sequence[float], rephrase_acc: Sequence[float], loc_acc: Sequence[float]) -> dict[str, float]:
    return {"efficacy": _mean(src_acc), "generalization": _mean(rephrase_acc), "specificity": _mean(loc_acc)}


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks; a dependency-free stand-in for nltk.word_tokenize (MEMIT's choice)."""
    return re.findall(r"\w+|[^\w\s]", text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Mean over n of weight_n * Shannon entropy (bits) of the text's n-gram distribution (MEMIT's GE).

    Repetitive text has few distinct n-grams and a low entropy: the metric catches a model that
    degenerates into loops after an edit.
    """
    tokens = word_tokens(text)
    terms = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        terms.append(w * -sum(c / total * math.log2(c / total) for c in counts.values()))
    return _mean(terms)
