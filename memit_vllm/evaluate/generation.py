"""`--generate`: the metrics as a user sees them (README "Evaluation"), shared by `eval` and `ab`.

Greedy completions of the rewrite and paraphrase prompts are checked against the new target's token ids;
those of the neighbour and unrelated prompts against the unedited model's completions; the next-token
KL(unedited || edited) is taken on held-out text. Unrelated prompts default to the rewrite prompts of
the data file's records after the evaluated ones (other subjects, same relation templates: the prompts
whose keys most resemble the edited ones); the held-out text to the last texts of the project's
covariance corpus, which `covariance_budget` keeps out of a patch's statistics.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from ..core.records import CounterFactRecord, parse_record, read_dataset, read_prompts
from ..errors import MemitError
from .metrics import CONFIDENT_MARGIN, KL_TOP_K, Completion, GeneratedRecord, hit_metrics, kept_metrics, topk_kl

NEW_TOKENS = 8
UNRELATED_PROMPTS = 100  # default: rewrite prompts of the records after the evaluated ones, at most this many
HELDOUT_TEXTS = 100  # the held-out slice: the last texts of the held-out file
HELDOUT_MAX_TOKENS = 64  # per text: the KL costs two forwards per position (CPU minutes)
# The project's covariance corpus beside the checkout (README "Where things live"); --heldout overrides.
HELDOUT_DEFAULT = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus" / "smollm2_self_2k.jsonl"


def _edit_prompt(record) -> str:
    return record.rewrite_prompt if isinstance(record, CounterFactRecord) else record.src


def unrelated_prompts(data, fmt: str, records: list, patches=(), unrelated: str | Path | None = None,
                      count: int | None = None) -> tuple[list[str], str]:
    """The unrelated prompts and where they come from: `unrelated` (a prompts file), else the edit
    prompts of the records after the evaluated ones in `data` (at most `count`, default UNRELATED_PROMPTS),
    skipping subjects that are evaluated or edited by a patch. May be empty (the metrics are then left out).
    Only their prompts are used, so zsRE records are read with the default target whatever the edits
    use (some zsRE records have an empty `alt`)."""
    if unrelated is not None:
        if count is not None:
            raise MemitError(f"--unrelated-count {count} counts the default unrelated prompts (the records after "
                             f"the evaluated ones); --unrelated {unrelated} gives its own: drop one of the two")
        return [x["prompt"] for x in read_prompts(unrelated, "--unrelated")], str(Path(unrelated).resolve())
    _, everything = read_dataset(data, None, fmt)
    edited = {r.subject for r in records}
    for p in patches:
        edited |= {parse_record(r, "patch request").subject for r in p.requests}
    rest = [_edit_prompt(r) for r in everything[len(records):] if r.subject not in edited][:count or UNRELATED_PROMPTS]
    source = f"edit prompts of records {len(records)}.. of {Path(data).name}, other subjects"
    return rest, source


def heldout_texts(path: str | Path) -> list[str]:
    """The last HELDOUT_TEXTS texts of a .txt/.jsonl file read like a covariance corpus."""
    from ..editor.covariance import file_corpus

    path = Path(path)
    if not path.is_file() or path.suffix not in (".txt", ".jsonl"):
        raise MemitError(f"--heldout {path}: expected an existing .txt or .jsonl file")
    texts = list(file_corpus(path).texts())
    if not texts:
        raise MemitError(f"--heldout {path} holds no texts")
    return texts[-HELDOUT_TEXTS:]


def covariance_budget(tokenizer, path: str | Path = HELDOUT_DEFAULT) -> int:
    """The covariance token budget (`stats_tokens`) that reads `path` up to its held-out slice and no
    further: the corpus is read in order and cut exactly at the budget (editor.covariance)."""
    from ..editor.covariance import Corpus, file_corpus, token_batches

    whole = file_corpus(Path(path))
    n = sum(1 for _ in whole.texts()) - HELDOUT_TEXTS
    if n <= 0:
        raise MemitError(f"{path} holds no texts before its last {HELDOUT_TEXTS}")
    head = Corpus(whole.identity, lambda: itertools.islice(whole.texts(), n), whole.description)
    return sum(len(ids) for batch in token_batches(tokenizer, head, None) for ids in batch)


def _covariance_overlap(path: Path, tokenizer, patches) -> bool | None:
    """Whether a patch's covariance read the held-out slice of `path` (None: no patch used that file)."""
    identity = f"file:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    used = [max(p.covariance.get("tokens", {}).values(), default=0) for p in patches
            if p.covariance.get("corpus") == identity]
    return max(used) > covariance_budget(tokenizer, path) if used else None


@dataclass
class Generated:
    """One model's completions of a task's prompts (in the task's order)."""

    hits: list[Completion]
    kept: list[Completion]


@dataclass
class GenerationTask:
    """Every prompt `--generate` completes, as flat lists the scorers batch, with per-record spans."""

    new_tokens: int
    hit_prompts: list[str] = field(default_factory=list)
    hit_targets: list[tuple[int, ...]] = field(default_factory=list)
    hit_spans: list[tuple[range, range]] = field(default_factory=list)  # per record: rewrite, paraphrases
    kept_prompts: list[str] = field(default_factory=list)  # neighbours, then the unrelated prompts
    neighbour_spans: list[range] = field(default_factory=list)
    n_unrelated: int = 0
    heldout: list[list[int]] = field(default_factory=list)  # token ids of the held-out texts
    info: dict = field(default_factory=dict)  # what the report says about the task

    @property
    def hit_tokens(self) -> int:
        """A rewrite completion must be long enough to hold the longest target."""
        return max([self.new_tokens, *map(len, self.hit_targets)])

    def complete(self, scorer) -> Generated:
        return Generated(scorer.greedy(self.hit_prompts, self.hit_tokens, desc="rewrite/paraphrase"),
                         scorer.greedy(self.kept_prompts, self.new_tokens, desc="neighbour/unrelated"))

    def metrics(self, after: Generated, before: Generated | None) -> dict[str, float]:
        """Hits of `after`; with the unedited `before`, what `after` kept of it (before vs itself: 1)."""
        records = [GeneratedRecord(
            rewrite=[(after.hits[i], self.hit_targets[i]) for i in rw],
            paraphrase=[(after.hits[i], self.hit_targets[i]) for i in pp],
            neighbours=[(before.kept[i], after.kept[i]) for i in nb] if before else [])
            for (rw, pp), nb in zip(self.hit_spans, self.neighbour_spans)]
        out = hit_metrics(records)
        if before:
            start = len(self.kept_prompts) - self.n_unrelated
            unrelated = list(zip(before.kept[start:], after.kept[start:]))
            out |= kept_metrics(records, unrelated)
        return out

    def confident(self, before: Generated) -> int:
        """How many unrelated prompts the unedited model completes confidently (CONFIDENT_MARGIN)."""
        return sum(c.margin >= CONFIDENT_MARGIN for c in before.kept[len(self.kept_prompts) - self.n_unrelated:])


def generation_task(tokenizer, fmt: str, records: list, unrelated: list[str], unrelated_source: str,
                    heldout: str | Path | None, patches=(), new_tokens: int = NEW_TOKENS) -> GenerationTask:
    """The prompts of `records` (CounterFact or zsRE), the unrelated prompts, and the held-out slice of
    `heldout` (None: HELDOUT_DEFAULT where it exists, else no KL)."""
    from .scoring import encode_pair

    task = GenerationTask(new_tokens)
    for r in records:
        if isinstance(r, CounterFactRecord):
            rewrite, paraphrase, target, neighbours = [r.rewrite_prompt], r.paraphrase_prompts, r.target_new, \
                r.neighborhood_prompts
        else:
            rewrite, paraphrase, target, neighbours = [r.src], [r.rephrase], r.target, [r.loc]
        spans = []
        for prompts in (rewrite, paraphrase):
            start = len(task.hit_prompts)
            task.hit_prompts += prompts
            task.hit_targets += [tuple(encode_pair(tokenizer, p, target)[1]) for p in prompts]
            spans.append(range(start, len(task.hit_prompts)))
        task.hit_spans.append(tuple(spans))
        start = len(task.kept_prompts)
        task.kept_prompts += neighbours
        task.neighbour_spans.append(range(start, len(task.kept_prompts)))
    task.kept_prompts += unrelated
    task.n_unrelated = len(unrelated)
    path = Path(heldout) if heldout is not None else (HELDOUT_DEFAULT if HELDOUT_DEFAULT.is_file() else None)
    if path is not None:
        task.heldout = [tokenizer(t, truncation=True, max_length=HELDOUT_MAX_TOKENS)["input_ids"]
                        for t in heldout_texts(path)]
        task.heldout = [ids for ids in task.heldout if len(ids) > 1]
    task.info = {
        "new_tokens": new_tokens, "confident_margin": CONFIDENT_MARGIN, "unrelated": unrelated_source,
        "unrelated_prompts": len(unrelated),
        "heldout": None if path is None else {
            "path": str(path.resolve()), "texts": len(task.heldout), "slice": f"last {HELDOUT_TEXTS} texts",
            "positions": sum(len(ids) - 1 for ids in task.heldout), "kl_top_k": KL_TOP_K,
            "covariance_overlap": _covariance_overlap(path, tokenizer, patches)}}
    return task


def served_kl(before, after, texts: list[list[int]]) -> float:
    """The top-k KL estimate (metrics.topk_kl) between two served models, averaged over positions."""
    pairs = [(p, q) for tp, tq in zip(before.top_logprobs(texts), after.top_logprobs(texts)) for p, q in zip(tp, tq)]
    return sum(topk_kl(p, q) for p, q in pairs) / len(pairs)
