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
from dataclasses import dataclass, field

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
# `--generate` (README "Evaluation"): what a user reads, greedy completions, instead of teacher-forced scores.
# The "kept" metrics and the KLs compare the edited model with the unedited one, so their "before" is 1 / 0.
GENERATION_METRICS = {
    "rewrite_hit": "greedy completion of the rewrite prompt starts with the new target's tokens",
    "paraphrase_hit": "same, on paraphrases",
    "neighbour_word_kept": "neighbours: completion's first word as the unedited model's",
    "neighbour_kept": "neighbours: all N completion tokens as the unedited model's",
    "unrelated_word_kept": "unrelated prompts: completion's first word as the unedited model's",
    "unrelated_kept": "unrelated prompts: all N completion tokens as the unedited model's",
    "unrelated_word_kept_confident": "same as unrelated_word_kept, where the unedited p1 - p2 >= 0.3",
    "heldout_kl": "mean next-token KL(unedited || edited) on held-out text, nats (transformers only)",
    "heldout_kl_top20": "the same KL on the two top-20 lists' common tokens + the rest (a lower bound)",
}
# A first new token whose top-1 probability leads the top-2 by this much is one the unedited model was
# sure of: a flip there is a regression a user notices, while SmolLM2's many flat distributions flip
# at the slightest change (0.3: 30 of the 100 default unrelated prompts qualify on SmolLM2, n=10).
CONFIDENT_MARGIN = 0.3
KL_TOP_K = 20  # vLLM's default --max-logprobs: the most a stock server returns per position
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


# -- generated metrics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Completion:
    """A greedy completion: its new tokens (through the EOS that ended it, if one did), their text, and
    the top-1 minus top-2 probability of its first token."""

    tokens: tuple[int, ...]
    text: str
    margin: float


@dataclass(frozen=True)
class GeneratedRecord:
    """One record's completions: rewrite and paraphrase ones with their target's token ids, and
    (unedited, edited) pairs of its neighbour prompts (empty when there is no unedited model to ask)."""

    rewrite: list[tuple[Completion, tuple[int, ...]]]
    paraphrase: list[tuple[Completion, tuple[int, ...]]]
    neighbours: list[tuple[Completion, Completion]] = field(default_factory=list)


def target_hit(completion: Completion, target: Sequence[int]) -> bool:
    """Token level: the completion's first tokens are the target's, as the prompt + target would be fed."""
    return bool(target) and completion.tokens[:len(target)] == tuple(target)


def first_word(text: str) -> str:
    words = word_tokens(text)
    return words[0] if words else ""


def _same_word(pair: tuple[Completion, Completion]) -> float:
    return float(first_word(pair[0].text) == first_word(pair[1].text))


def _same_tokens(pair: tuple[Completion, Completion]) -> float:
    return float(pair[0].tokens == pair[1].tokens)


def hit_metrics(records: Sequence[GeneratedRecord]) -> dict[str, float]:
    """Per record first, then over records, like the teacher-forced scores."""
    def per_record(select):
        return _mean([_mean([float(target_hit(c, t)) for c, t in select(r)]) for r in records if select(r)])

    return {"rewrite_hit": per_record(lambda r: r.rewrite), "paraphrase_hit": per_record(lambda r: r.paraphrase)}


def kept_metrics(records: Sequence[GeneratedRecord], unrelated: Sequence[tuple[Completion, Completion]],
                 margin: float = CONFIDENT_MARGIN) -> dict[str, float]:
    """Neighbours per record then over records; unrelated prompts pooled (they belong to no record).
    Without unrelated prompts their metrics are left out."""
    out = {"neighbour_word_kept": _mean([_mean([_same_word(p) for p in r.neighbours]) for r in records
                                         if r.neighbours]),
           "neighbour_kept": _mean([_mean([_same_tokens(p) for p in r.neighbours]) for r in records if r.neighbours])}
    if unrelated:
        out["unrelated_word_kept"] = _mean([_same_word(p) for p in unrelated])
        out["unrelated_kept"] = _mean([_same_tokens(p) for p in unrelated])
        out["unrelated_word_kept_confident"] = _mean([_same_word(p) for p in unrelated if p[0].margin >= margin])
    return out


def topk_kl(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(P || Q) from each side's top-k log-probabilities only (token id -> logprob): the vocabulary is
    grouped into the tokens both lists hold, one bucket each, and one bucket for all the rest, whose
    mass is 1 minus theirs. Grouping never raises a KL (data processing inequality), so this is a lower
    bound of the full KL, exact when the common tokens hold all of P's mass; both backends compute it
    from the same inputs. A rest of Q rounded to zero is floored at 1e-12."""
    common = p.keys() & q.keys()
    kl = sum(math.exp(p[i]) * (p[i] - q[i]) for i in common)
    p_rest = max(1.0 - sum(math.exp(p[i]) for i in common), 0.0)
    q_rest = max(1.0 - sum(math.exp(q[i]) for i in common), 1e-12)
    return kl + (p_rest * math.log(p_rest / q_rest) if p_rest > 0 else 0.0)
