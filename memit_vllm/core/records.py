"""Edit records: the one schema, and the readers of every layout people already have.

Layouts read (detected per record):
- CounterFact, full schema: {case_id, requested_rewrite: {prompt "{}...", subject, target_new: {str},
  target_true: {str}}, paraphrase_prompts, neighborhood_prompts, ...}
- EasyEdit's shortened CounterFact: {prompt (subject spelled out), subject, target_new, ground_truth,
  rephrase_prompt, locality_prompt, locality_ground_truth}
- zsRE (MEND split): {subject, src, rephrase, answers: [...], alt, loc, loc_ans}
- ours: {prompt, subject, target_new, target_true?, case_id?, paraphrases?} with "{}" where the subject
  goes (or the subject spelled out), in JSON, JSONL or CSV. `paraphrases` (read in every layout: no
  dataset uses the name, so CounterFact's own paraphrase_prompts stay held out for scoring) are other
  phrasings of the prompt that the z optimisation trains on too.

Every reader ends in `EditRequest` (what make-patch edits and what a patch header records, see
docs/patch-format.md) or, for evaluation, in `CounterFactRecord` / `ZsreRecord`. A malformed record is
a MemitError naming the file, the record (the line, for JSONL) and what to fix.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MemitError

ZSRE_TARGETS = ("answers", "alt")  # zsRE: edit toward answers[0] (MEMIT's code) or alt (the toolkits)
FORMATS = ("counterfact", "counterfact-edit", "zsre")  # the evaluation layouts
MAX_RECORDS_FILE_BYTES = 1 << 30  # a records or prompts file is read whole: refuse what cannot be one


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit; `to_dict()` is what a patch header's `requests` holds."""

    prompt: str  # holds "{}" exactly once, where the subject goes
    subject: str
    target_new: str  # with a leading space, as it follows the prompt
    target_true: str | None = None
    case_id: str | None = None
    paraphrases: tuple[str, ...] = ()  # other phrasings, each holding "{}" once, as `prompt`

    def text(self) -> str:
        return self.prompt.format(self.subject)

    @property
    def fact(self) -> tuple[str, str]:
        """What a request is about, whatever its target: two requests with the same fact edit one thing."""
        return self.prompt, self.subject

    def to_dict(self) -> dict:
        """Unknown or empty fields are left out (a request without paraphrases reads as it always did)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v not in (None, ())}


@dataclass(frozen=True)
class CounterFactRecord:
    case_id: int | str
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
    case_id: int | str
    subject: str
    src: str
    rephrase: str
    target: str  # answers[0] (the MEMIT code) or alt (the toolkits)
    loc: str
    loc_ans: str


# -- field readers: every value is type-checked, so a wrong type is an error, never a stringified target --
def _field(rec: dict, key: str, where: str):
    if key not in rec:
        raise MemitError(f"{where}: missing field {key!r}")
    return rec[key]


def _text(value, what: str, where: str) -> str:
    if isinstance(value, str) and not value.strip():
        raise MemitError(f"{where}: empty {what}")
    if not isinstance(value, str):
        raise MemitError(f"{where}: {what} must be a non-empty string, got {json.dumps(value)[:80]}")
    return value


def target_text(value, what: str, where: str) -> str:
    """A target as CounterFact ({"str": ...}) or plain text."""
    if isinstance(value, dict):
        value = _field(value, "str", f"{where} {what}")
    return _text(value, what, where)


def _texts(value, what: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise MemitError(f"{where}: {what} must be a list of strings")
    return [_text(v, what, where) for v in value]


def _escape(s: str) -> str:
    return s.replace("{", "{{").replace("}", "}}")


def template_prompt(prompt, subject, where: str) -> str:
    """The prompt with "{}" where the subject goes: kept if it holds "{}" once, else the subject's last
    occurrence is replaced (literal braces elsewhere escaped, so .format(subject) gives the text back)."""
    prompt, subject = _text(prompt, "prompt", where), _text(subject, "subject", where)
    if prompt.count("{}") != 1:
        at = prompt.rfind(subject)
        if at < 0:
            raise MemitError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; "
                             "put '{}' where the subject goes or fix the subject")
        prompt = _escape(prompt[:at]) + "{}" + _escape(prompt[at + len(subject):])
    try:
        prompt.format(subject)
    except (KeyError, IndexError, ValueError) as e:
        raise MemitError(f"{where}: prompt {prompt!r} holds braces besides the one '{{}}' for the subject; "
                         "double them ('{{' and '}}') to keep them literal") from e
    return prompt


def _spaced(target: str) -> str:
    return target if target.startswith(" ") else " " + target


def _case_id(rec: dict, where: str) -> str | None:
    """A record's id as text; a list or an object would become its Python spelling (the header's id)."""
    value = rec.get("case_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MemitError(f"{where}: case_id must be a number or a string, not {json.dumps(value)[:40]}")
    return str(value)


# -- edit requests -----------------------------------------------------------------------------------
def parse_record(rec, where: str, zsre_target: str = "answers") -> EditRequest:
    """One record of any supported layout as an EditRequest; `where` names it in errors."""
    if not isinstance(rec, dict):
        raise MemitError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if "requested_rewrite" in rec:  # CounterFact, full schema
        rw = rec["requested_rewrite"]
        if isinstance(rw, list):
            if not rw:
                raise MemitError(f"{where}: requested_rewrite is an empty list")
            rw = rw[0]
        if not isinstance(rw, dict):
            raise MemitError(f"{where}: requested_rewrite must be an object")
        prompt, subject = _field(rw, "prompt", where), _field(rw, "subject", where)
        new, true = _field(rw, "target_new", where), rw.get("target_true")
    elif "src" in rec and "answers" in rec:  # zsRE
        prompt, subject, true = rec["src"], _field(rec, "subject", where), None
        if zsre_target == "answers":
            answers = _texts(rec["answers"], "answers", where)
            if not answers:
                raise MemitError(f"{where}: answers is an empty list")
            new = answers[0]
        else:
            new = _field(rec, "alt", where)
    elif "target_new" in rec:  # EasyEdit shortened / ours
        prompt, subject = _field(rec, "prompt", where), _field(rec, "subject", where)
        new, true = rec["target_new"], rec.get("target_true", rec.get("ground_truth"))
    else:
        raise MemitError(f"{where}: unknown record layout (keys {sorted(rec)}); expected CounterFact, zsRE, or "
                         "{prompt, subject, target_new[, target_true]}")
    if isinstance(true, list):  # EasyEdit sometimes lists the true answers
        true = true[0] if true else None
    paraphrases = _texts(rec.get("paraphrases", []), "paraphrases", where)
    return EditRequest(
        prompt=template_prompt(prompt, subject, where), subject=subject,
        target_new=_spaced(target_text(new, "target_new", where)),
        target_true=None if true in (None, "") else _spaced(target_text(true, "target_true", where)),
        case_id=_case_id(rec, where),
        paraphrases=tuple(template_prompt(p, subject, f"{where} paraphrase {i}") for i, p in enumerate(paraphrases)))


def read_text_file(path: Path, label: str, max_bytes: int = MAX_RECORDS_FILE_BYTES, fix: str = "split it") -> str:
    """A small input file (records, prompts, hparams), read whole: a regular file (not /dev/zero, a FIFO or
    a directory) of at most `max_bytes` (no more is read, whatever it grows to meanwhile), UTF-8. `label`
    names it in errors, `fix` says what to do with one too large. A UTF-8 byte order mark (Excel's "CSV UTF-8",
    Windows Notepad) is dropped: left in, it hid a CSV's first column name and broke JSON."""
    if not path.is_file():
        raise MemitError(f"{label} does not exist (or is not a regular file)")
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise MemitError(f"{label}: cannot read it ({e.strerror or e})") from e
    if len(raw) > max_bytes:
        raise MemitError(f"{label} is larger than {max_bytes >> 20} MiB; {fix}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MemitError(f"{label} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e


def parse_json(text: str, what: str):
    """json.loads, refusing an object that names a key twice, which json reads as its last value unseen (a
    record's second "target_new", an hparams file's second "layers"): a MemitError naming `what`. A syntax
    error stays a json.JSONDecodeError for the caller to word."""
    def unique(pairs: list[tuple[str, object]]) -> dict:
        out = {}
        for key, value in pairs:
            if key in out:
                raise MemitError(f"{what}: key {key!r} appears twice in one object; keep one")
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=unique)


def read_records(path: str | Path) -> list[tuple[str, object]]:
    """(where, record) of every record in a JSON (a list or one object), JSONL or CSV file; `where`
    names the file and the record (its line, for JSONL) for error messages."""
    path = Path(path)
    text = read_text_file(path, str(path))
    if path.suffix == ".csv":
        rows = csv.DictReader(io.StringIO(text))
        twice = sorted({c for c in rows.fieldnames or () if rows.fieldnames.count(c) > 1})
        if twice:  # DictReader keeps the last column of a name
            raise MemitError(f"{path}: column {twice[0]!r} appears twice in the header row; keep one")
        out = [(f"{path} row {i + 2}", dict(r)) for i, r in enumerate(rows)]
        for where, r in out:  # DictReader keys the surplus values None: an unquoted comma shifted the row
            if None in r:
                raise MemitError(f"{where} has {len(rows.fieldnames) + len(r[None])} values for "
                                 f"{len(rows.fieldnames)} columns; quote a value that holds a comma (\"a, b\")")
        return out
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    where = f"{path} record {len(out)} (line {i + 1})"
                    out.append((where, parse_json(line, where)))
                except json.JSONDecodeError as e:
                    raise MemitError(f"{path} line {i + 1} is not valid JSON ({e.msg})") from e
        return out
    try:
        data = parse_json(text, str(path))
    except json.JSONDecodeError as e:
        raise MemitError(f"{path} is not valid JSON ({e}); use .jsonl for one record per line") from e
    return [(f"{path} record {i}", r) for i, r in enumerate(data if isinstance(data, list) else [data])]


def load_requests(path: str | Path, limit: int | None = None, zsre_target: str = "answers") -> list[EditRequest]:
    """The edit requests of a file (the first `limit`), validated."""
    check_zsre_target(zsre_target)
    if limit is not None and limit < 1:
        raise MemitError(f"--limit {limit}: expected a positive number of records")
    records = read_records(path)[:limit]
    requests = [parse_record(r, where, zsre_target) for where, r in records]
    return validate_requests(requests, str(path))


def without_conflicts(path: str | Path, n: int | None = None) -> tuple[list, int]:
    """The first `n` raw records of `path` that make-patch accepts together: a record asking a fact that
    an earlier record asks to become something else is dropped (counterfact_edit_10k has such pairs).
    Returns (records, how many were dropped)."""
    kept, seen, dropped = [], {}, 0
    for where, rec in read_records(path):
        r = parse_record(rec, where)
        if seen.setdefault(r.fact, r.target_new) != r.target_new:
            dropped += 1
            continue
        kept.append(rec)
        if len(kept) == n:
            break
    return kept, dropped


def check_zsre_target(zsre_target: str) -> None:
    if zsre_target not in ZSRE_TARGETS:
        raise MemitError(f"zsRE target must be one of {', '.join(ZSRE_TARGETS)}, not {zsre_target!r}")


def validate_requests(requests: list[EditRequest], source: str = "requests") -> list[EditRequest]:
    """Reject what cannot be edited, before any model is loaded."""
    if not requests:
        raise MemitError(f"{source}: no edit requests")
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, r in enumerate(requests):
        where = f"{source} record {i}" + (f" (case {r.case_id})" if r.case_id else "")
        for what, prompt in [("prompt", r.prompt)] + [(f"paraphrase {j}", p) for j, p in enumerate(r.paraphrases)]:
            if not isinstance(prompt, str) or prompt.count("{}") != 1:
                raise MemitError(f"{where}: {what} {prompt!r} must hold '{{}}' exactly once")
        if not r.target_new.strip():
            raise MemitError(f"{where}: empty target_new")
        key = r.fact
        if key in seen and seen[key][1] != r.target_new:
            raise MemitError(f"{where}: {r.text()!r} is asked to become {r.target_new!r}, but record "
                             f"{seen[key][0]} asks for {seen[key][1]!r}; keep one")
        seen.setdefault(key, (i, r.target_new))
    return requests


def _json_or_jsonl(text: str, what: str):
    """One JSON document, else one JSON value per non-empty line (json.JSONDecodeError if neither)."""
    try:
        return parse_json(text, what)
    except json.JSONDecodeError:
        return [parse_json(line, f"{what} line {i + 1}") for i, line in enumerate(text.splitlines()) if line.strip()]


def read_prompts(path: str | Path, flag: str) -> list[dict]:
    """Prompts as a JSON list or JSONL of strings or {"prompt", "answer"?} objects (eval --unrelated, ab
    --regression, make-patch --preserve). The content decides which, whatever the file's suffix (unlike
    edit records, read_records)."""
    try:
        items = _json_or_jsonl(read_text_file(Path(path), f"{flag} {path}"), f"{flag} {path}")
    except json.JSONDecodeError as e:
        raise MemitError(f"{flag} {path}: neither JSON nor JSONL ({e})") from e
    out = []
    for i, item in enumerate(items if isinstance(items, list) else [items]):
        item = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise MemitError(f"{flag} {path}: item {i} is not a prompt string or {{\"prompt\": ...}}")
        out.append({"prompt": item["prompt"], "answer": item.get("answer")})
    if not out:
        raise MemitError(f"{flag} {path} holds no prompts")
    return out


def read_subjects(path: str | Path, flag: str) -> list[str]:
    """Subject names: a JSON list or JSONL of strings, or plain text with one name per line
    (make-patch --neighbour-subjects)."""
    text = read_text_file(Path(path), f"{flag} {path}")
    try:
        items = _json_or_jsonl(text, f"{flag} {path}")
    except json.JSONDecodeError:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
        raise MemitError(f"{flag} {path}: expected subject names (a JSON list of strings, JSONL strings or one "
                         "name per line)")
    if not items:
        raise MemitError(f"{flag} {path} holds no subjects")
    return [x.strip() for x in items]


# -- facts as people read them (inspect, diff) --------------------------------------------------------
def fact_key(request: dict) -> str:
    """What identifies a fact across patches: the prompt with its subject filled in."""
    try:
        return parse_record(request, "fact").text()
    except MemitError:  # a header written by another tool: show it as it is
        return json.dumps(request, sort_keys=True)


def fact_text(request: dict) -> str:
    """One line: 'prompt -> new (was: old)'."""
    try:
        r = parse_record(request, "fact")
    except MemitError:
        return json.dumps(request, sort_keys=True)
    old = f" (was:{r.target_true})" if r.target_true else ""
    return f"{r.text()} ->{r.target_new}{old}"


# -- evaluation records ------------------------------------------------------------------------------
def detect_format(record, where: str) -> str:
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if {"prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt"} <= record.keys():
            return "counterfact-edit"
        if {"src", "rephrase", "answers", "loc", "loc_ans"} <= record.keys():
            return "zsre"
    what = f"keys {sorted(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
    raise MemitError(f"{where}: unknown data format ({what}); expected one of: {', '.join(FORMATS)}")


def _counterfact(r, where: str, i: int) -> CounterFactRecord:
    req = parse_record(r, where)
    rw = _field(r, "requested_rewrite", where)
    rw = rw[0] if isinstance(rw, list) else rw
    true = target_text(_field(rw, "target_true", where), "target_true", where)
    return CounterFactRecord(
        case_id=r.get("case_id", i), subject=req.subject, prompt=req.prompt, target_new=req.target_new.lstrip(" "),
        target_true=true, paraphrase_prompts=_texts(r.get("paraphrase_prompts", []), "paraphrase_prompts", where),
        neighborhood_prompts=_texts(r.get("neighborhood_prompts", []), "neighborhood_prompts", where),
        neighborhood_true=true,
        generation_prompts=_texts(r.get("generation_prompts", []), "generation_prompts", where))


def _counterfact_edit(r, where: str, i: int) -> CounterFactRecord:
    req = parse_record(r, where)
    return CounterFactRecord(
        case_id=r.get("case_id", i), subject=req.subject, prompt=req.prompt, target_new=req.target_new.lstrip(" "),
        target_true=target_text(_field(r, "ground_truth", where), "ground_truth", where),
        paraphrase_prompts=_texts(_field(r, "rephrase_prompt", where), "rephrase_prompt", where),
        neighborhood_prompts=_texts(_field(r, "locality_prompt", where), "locality_prompt", where),
        neighborhood_true=target_text(_field(r, "locality_ground_truth", where), "locality_ground_truth", where))


def _zsre(r, where: str, i: int, target: str) -> ZsreRecord:
    req = parse_record(r, where, target)
    return ZsreRecord(case_id=r.get("case_id", i), subject=req.subject,
                      src=_text(_field(r, "src", where), "src", where),
                      rephrase=_text(_field(r, "rephrase", where), "rephrase", where),
                      target=req.target_new.lstrip(" "), loc=_text(_field(r, "loc", where), "loc", where),
                      loc_ans=_text(_field(r, "loc_ans", where), "loc_ans", where))


def read_dataset(path: str | Path, n: int | None = None, fmt: str = "auto",
                 zsre_target: str = "answers") -> tuple[str, list[CounterFactRecord] | list[ZsreRecord]]:
    """The first `n` records of a data file, and its format (detected from the first record if "auto")."""
    check_zsre_target(zsre_target)
    if fmt != "auto" and fmt not in FORMATS:
        raise MemitError(f"unknown data format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")
    raw = read_records(path)
    if not raw:
        raise MemitError(f"data file {path} holds no records")
    raw = raw[:n] if n is not None else raw
    if fmt == "auto":
        fmt = detect_format(raw[0][1], raw[0][0])
    readers = {"counterfact": _counterfact, "counterfact-edit": _counterfact_edit,
               "zsre": lambda r, where, i: _zsre(r, where, i, zsre_target)}
    return fmt, [readers[fmt](r, where, i) for i, (where, r) in enumerate(raw)]
