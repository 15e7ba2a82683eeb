"""Edit requests in the formats people already have, normalised to one record and validated early.

Accepted: CounterFact (full schema), the EasyEdit shortened CounterFact, zsRE, and our own JSON/JSONL/CSV
records {prompt, subject, target_new, target_true?} where the prompt holds "{}" or the subject itself.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MemitError

ZSRE_TARGETS = ("answers", "alt")


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # holds "{}" exactly once, where the subject goes
    subject: str
    target_new: str  # with a leading space, as it follows the prompt
    target_true: str | None = None
    case_id: str | None = None

    def text(self) -> str:
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _space(target) -> str:
    target = str(target)
    return target if target.startswith(" ") else " " + target


def _templated(prompt: str, subject: str, where: str) -> str:
    """Put "{}" where the subject goes (its last occurrence, if the prompt spells it out)."""
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
        raise MemitError(f"{where}: prompt and subject must be non-empty strings")
    if prompt.count("{}") == 1:
        return prompt
    if "{" in prompt or "}" in prompt:
        prompt = prompt.replace("{", "{{").replace("}", "}}")
    i = prompt.rfind(subject)
    if i < 0:
        raise MemitError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; "
                         "put '{}' where the subject goes or fix the subject")
    return prompt[:i] + "{}" + prompt[i + len(subject):]


def parse_record(rec: dict, where: str, zsre_target: str = "answers") -> EditRequest:
    """One record of any supported format as an EditRequest; `where` names it in errors."""
    if "requested_rewrite" in rec:  # CounterFact, full schema
        rw = rec["requested_rewrite"]
        rw = rw[0] if isinstance(rw, list) else rw
        new, true = rw["target_new"], rw.get("target_true")
        return _make(rw["prompt"], rw["subject"], new["str"] if isinstance(new, dict) else new,
                     (true["str"] if isinstance(true, dict) else true), rec.get("case_id"), where)
    if "src" in rec and "answers" in rec:  # zsRE
        target = rec["answers"][0] if zsre_target == "answers" else rec["alt"]
        return _make(rec["src"], rec["subject"], target, None, rec.get("case_id"), where)
    if "target_new" in rec and "subject" in rec and "prompt" in rec:  # EasyEdit shortened / our own
        true = rec.get("target_true", rec.get("ground_truth"))
        return _make(rec["prompt"], rec["subject"], rec["target_new"], true, rec.get("case_id"), where)
    raise MemitError(f"{where}: unknown record format (keys {sorted(rec)}); expected CounterFact, zsRE, or "
                     "{prompt, subject, target_new[, target_true]}")


def _make(prompt, subject, target_new, target_true, case_id, where) -> EditRequest:
    if target_new is None or not str(target_new).strip():
        raise MemitError(f"{where}: empty target_new")
    if isinstance(target_true, list):
        target_true = target_true[0] if target_true else None
    return EditRequest(
        prompt=_templated(prompt, subject, where), subject=subject, target_new=_space(target_new),
        target_true=_space(target_true) if target_true not in (None, "") else None,
        case_id=None if case_id is None else str(case_id),
    )


def _read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise MemitError(f"{path}: line {e.lineno} is not valid JSON") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MemitError(f"{path}: not valid JSON ({e}); use .jsonl for one record per line") from e
    return data if isinstance(data, list) else [data]


def load_requests(path: str | Path, limit: int | None = None, zsre_target: str = "answers") -> list[EditRequest]:
    path = Path(path)
    if not path.is_file():
        raise MemitError(f"requests file {path} does not exist")
    if zsre_target not in ZSRE_TARGETS:
        raise MemitError(f"zsre target must be one of {ZSRE_TARGETS}, not {zsre_target!r}")
    records = _read_records(path)[:limit]
    requests = [parse_record(r, f"{path} record {i}", zsre_target) for i, r in enumerate(records)]
    return validate_requests(requests, str(path))


def validate_requests(requests: list[EditRequest], source: str = "requests") -> list[EditRequest]:
    """Reject what cannot be edited, before any model is loaded."""
    if not requests:
        raise MemitError(f"{source}: no edit requests")
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, r in enumerate(requests):
        where = f"{source} record {i}" + (f" (case {r.case_id})" if r.case_id else "")
        if r.prompt.count("{}") != 1:
            raise MemitError(f"{where}: prompt {r.prompt!r} must hold '{{}}' exactly once")
        if not r.target_new.strip():
            raise MemitError(f"{where}: empty target_new")
        key = (r.prompt, r.subject)
        if key in seen and seen[key][1] != r.target_new:
            raise MemitError(f"{where}: {r.text()!r} is asked to become {r.target_new!r}, but record "
                             f"{seen[key][0]} asks for {seen[key][1]!r}; keep one")
        seen.setdefault(key, (i, r.target_new))
    return requests
