"""Readers for the knowledge-editing data sets, normalised to one record type per task.

Three layouts are read: full CounterFact (ROME/MEMIT), the shortened CounterFact of EasyEdit (subject
filled into `prompt`, one rephrase and one locality prompt) and zsRE (MEND split). Both CounterFact
layouts become `CounterFactRecord`, so one metric code path serves them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MemitError

FORMATS = ("counterfact", "counterfact-edit", "zsre")
ZSRE_TARGETS = ("answers", "alt")


@dataclass(frozen=True)
class CounterFactRecord:
    case_id: int
    subject: str
    prompt: str  # rewrite prompt with "{}" where the subject goes
    target_new: str
    target_true: str
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    # The true object of the neighbours: the edit's own target_true in full CounterFact, the
    # separate locality_ground_truth in the shortened layout.
    neighborhood_true: str
    generation_prompts: list[str] = field(default_factory=list)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class ZsreRecord:
    case_id: int
    subject: str
    src: str
    rephrase: str
    target: str  # answers[0] (the MEMIT code) or alt (the toolkits), see `read_dataset`
    loc: str
    loc_ans: str


def detect_format(record: dict) -> str:
    if "requested_rewrite" in record:
        return "counterfact"
    if {"prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt"} <= record.keys():
        return "counterfact-edit"
    if {"src", "rephrase", "answers", "loc", "loc_ans"} <= record.keys():
        return "zsre"
    raise MemitError(f"unknown data format (first record has keys {sorted(record)}); "
                     f"expected one of: {', '.join(FORMATS)}")


def _counterfact(r: dict) -> CounterFactRecord:
    rw = r["requested_rewrite"]
    return CounterFactRecord(
        case_id=r["case_id"], subject=rw["subject"], prompt=rw["prompt"], target_new=rw["target_new"]["str"],
        target_true=rw["target_true"]["str"], paraphrase_prompts=list(r["paraphrase_prompts"]),
        neighborhood_prompts=list(r["neighborhood_prompts"]), neighborhood_true=rw["target_true"]["str"],
        generation_prompts=list(r.get("generation_prompts", [])))


def _counterfact_edit(r: dict, i: int) -> CounterFactRecord:
    prompt, subject = r["prompt"], r["subject"]
    at = prompt.rfind(subject)
    if at < 0:
        raise MemitError(f"record {r.get('case_id', i)}: subject {subject!r} does not occur in prompt {prompt!r}")
    # Literal braces in the text must survive .format(subject).
    template = (prompt[:at].replace("{", "{{").replace("}", "}}") + "{}"
                + prompt[at + len(subject):].replace("{", "{{").replace("}", "}}"))
    return CounterFactRecord(
        case_id=r.get("case_id", i), subject=subject, prompt=template, target_new=r["target_new"],
        target_true=r["ground_truth"], paraphrase_prompts=[r["rephrase_prompt"]],
        neighborhood_prompts=[r["locality_prompt"]], neighborhood_true=r["locality_ground_truth"])


def _zsre(r: dict, i: int, target: str) -> ZsreRecord:
    return ZsreRecord(case_id=r.get("case_id", i), subject=r["subject"], src=r["src"], rephrase=r["rephrase"],
                      target=r["answers"][0] if target == "answers" else r["alt"], loc=r["loc"], loc_ans=r["loc_ans"])


def read_dataset(path: str | Path, n: int | None = None, fmt: str = "auto",
                 zsre_target: str = "answers") -> tuple[str, list[CounterFactRecord] | list[ZsreRecord]]:
    """The first `n` records of a data file, and its format (detected from the first record if "auto")."""
    path = Path(path)
    if not path.is_file():
        raise MemitError(f"data file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemitError(f"data file {path} is not valid JSON ({e})") from e
    if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) for r in raw):
        raise MemitError(f"data file {path} must hold a non-empty JSON list of records")
    if fmt == "auto":
        fmt = detect_format(raw[0])
    elif fmt not in FORMATS:
        raise MemitError(f"unknown data format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")
    if zsre_target not in ZSRE_TARGETS:
        raise MemitError(f"unknown zsRE target {zsre_target!r}; expected one of: {', '.join(ZSRE_TARGETS)}")
    raw = raw[:n] if n is not None else raw
    try:
        if fmt == "counterfact":
            records = [_counterfact(r) for r in raw]
        elif fmt == "counterfact-edit":
            records = [_counterfact_edit(r, i) for i, r in enumerate(raw)]
        else:
            records = [_zsre(r, i, zsre_target) for i, r in enumerate(raw)]
    except (KeyError, IndexError, TypeError) as e:
        raise MemitError(f"data file {path} does not match the {fmt} format (missing or malformed field {e})") from e
    return fmt, records
