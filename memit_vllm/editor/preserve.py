"""Keys whose outputs an update must leave alone: the facts of earlier patches in the lineage
(`make-patch --on`), the user's `--preserve` prompts, and the edits' prompts asked of other subjects
(`--neighbour-subjects`).

Their summed outer products K_p K_p^T join the layer solve (solve.py). For a lineage fact, the key at its
subject's last token averaged over the context templates (how it was inserted), as read on the model its
own patch left (cached: lineage_keys.py; hparams lineage_keys "current": re-read on the model as updated
so far, like the edit keys). For a --preserve prompt, read at each layer on the model as updated so far,
the key at every position of the prompt and of its answer but the last (every position whose output the
answer depends on), each weighted by HParams.preserve_weight (an edit key counts 1). With
HParams.own_prompt_weight, each edit's own prompt too, at every position but its subject's last token (the
edit key): an update meant to act there alone also moves the other positions' outputs, where the other
edits' changes cost rewrites. Their keys resemble the edit key, so holding them holds it a little too, but
less than the neighbours that would protect those positions instead (docs/hyperparameters.md, "Session 26").
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from ..core.files import atomic_file
from ..core.records import EditRequest, read_prompts, target_text
from ..core.tokens import BUCKET_OVERHEAD_TOKENS, length_batches, pad_id, pad_right, target_ids
from ..errors import MemitError
from .covariance import Corpus, token_batches
from .hparams import HParams
from .lineage_keys import LineageKeys
from .prompts import encode
from .restore import AnchoredTexts


@dataclass(frozen=True)
class PreservePrompt:
    prompt: str
    answer: str | None = None  # with its leading space, as it follows the prompt
    skip: int | None = None  # a token position not preserved (own_prompts: the edit key)


def read_preserve_file(path) -> list[PreservePrompt]:
    """The prompts of a --preserve file (core.records.read_prompts: prompt strings or {"prompt", "answer"})."""
    out = []
    for p in read_prompts(path, "--preserve"):
        answer = target_text(p["answer"], "answer", f"--preserve {path}") if p["answer"] else None
        out.append(PreservePrompt(p["prompt"], answer if answer is None or answer.startswith(" ") else " " + answer))
    return out


def neighbour_pool(requests: list[EditRequest], subjects: list[str], source: str = "--neighbour-subjects",
                   edited: set[str] = frozenset()) -> list[str]:
    """The subjects neighbours are drawn from: never one being edited, nor one of `edited` (the lineage's,
    whose facts are not the base's to keep). `source` names where `subjects` came from, in messages."""
    pool = sorted(set(subjects) - {r.subject for r in requests} - set(edited))
    if not pool:
        raise MemitError(f"{source}: every subject in it is being edited; give other subjects")
    return pool


def neighbour_prompts(requests: list[EditRequest], subjects: list[str], per_edit: int, seed: int,
                      source: str = "--neighbour-subjects", edited: set[str] = frozenset()) -> list[PreservePrompt]:
    """Each edit's prompt asked of `per_edit` other subjects (a seeded sample of `neighbour_pool`). An update
    learns "this relation -> the new object" for any subject whose key resembles the edited ones; in the
    solve these keys say what it must leave alone (docs/hyperparameters.md, "Drift")."""
    pool = neighbour_pool(requests, subjects, source, edited)
    rnd = random.Random(seed)
    return [PreservePrompt(replace(r, subject=s).text()) for r in requests
            for s in rnd.sample(pool, min(per_edit, len(pool)))]


def own_prompts(tok, requests: list[EditRequest]) -> list[PreservePrompt]:
    """Each edit's own (bare) prompt, its subject's last token skipped: where the update is to act."""
    return [PreservePrompt(r.text(), skip=encode(tok, "{}", r).lookup) for r in requests]


_NAME_WORD = re.compile(r" [A-Z][a-z]{3,}")
# --neighbour-subjects vocab:N (made-up names from the tokenizer) or model:N (names the model lists itself)
GENERATED = ("vocab", "model")
NO_NEIGHBOURS = "none"  # --neighbour-subjects none: none, whatever the hparams say
# vocab:N / model:N at most: a pool each edit's neighbours are sampled from (SmolLM2's preset: model:2000).
# model:N lists ~5 names a second on one core; an unbounded N ran (or built its list) without end.
MAX_GENERATED_NAMES = 100_000


def generated_subjects(spec) -> tuple[str, int] | None:
    """(kind, N) of a `vocab:N` or `model:N` --neighbour-subjects, None when `spec` names a file (checked
    before any model loads)."""
    kind, sep, n = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or kind not in GENERATED:
        return None
    if not n.isdigit() or not 1 <= int(n) <= MAX_GENERATED_NAMES:
        raise MemitError(f"--neighbour-subjects {spec!r}: expected {kind}:N with N an integer from 1 to "
                         f"{MAX_GENERATED_NAMES} (e.g. {kind}:2000), or a file of subject names")
    return kind, int(n)


def vocabulary_subjects(tok, count: int, seed: int) -> list[str]:
    """`count` made-up names of two capitalised whole-word tokens of the model's own vocabulary
    ("Taylor Darwin"): other subjects for --neighbour-subjects when none are given, built from the
    tokenizer alone (no data file). What the update must leave alone is mostly the relation's template
    with any subject in it (docs/hyperparameters.md, "Drift"), not these names' facts."""
    words = sorted({w.strip() for w in (tok.decode([i]) for i in range(len(tok))) if _NAME_WORD.fullmatch(w)})
    if len(words) < 2:
        raise MemitError("the tokenizer has too few capitalised word tokens to make neighbour subjects; give "
                         "--neighbour-subjects FILE")
    rnd = random.Random(seed)
    return [f"{a} {b}" for a, b in (rnd.sample(words, 2) for _ in range(count))]


# The kinds of thing facts are about: the model is asked to list well-known ones of each (model_subjects).
NAME_KINDS = ("people", "cities", "countries", "companies", "musicians", "football clubs", "actors", "writers",
              "scientists", "politicians", "rivers", "universities", "television shows", "video games", "bands",
              "athletes", "painters", "car brands", "newspapers", "mountains", "films", "books", "languages",
              "religions", "sports teams", "inventors", "philosophers", "composers", "islands", "buildings")
_LIST_ITEM = re.compile(r"(?:\d+\.)?\s*\"?([A-Z][\w.'&-]*(?: [\w.'&][\w.'&-]*){0,4})\"?\s*(?:$|[(:,\u2013\u2014-])")
_LIST_NEW_TOKENS = 64
_CACHE_BYTES = 1 << 24  # a names cache file is at most this large (2,000 names: ~30 kB)


def _listed_names(text: str) -> list[str]:
    """The names of a sampled numbered list ("Paris\n2. Venice\n3. London (UK)..."): each line's leading
    capitalised run of at most five words, up to the first bracket, colon, comma or dash."""
    names = []
    for i, line in enumerate(text.split("\n")):
        line = line.strip()
        if i and not re.match(r"\d+\.", line):
            break  # the list ended
        m = _LIST_ITEM.match(line)
        if m and len(m.group(1)) <= 40 and any(c.isalpha() for c in m.group(1)):
            names.append(m.group(1).strip(" .-"))
    return [n for n in names if n]


@torch.no_grad()
def model_subjects(model, tok, count: int, seed: int, progress: bool = False) -> list[str]:
    """`count` names the model itself lists when asked for well-known things of each of NAME_KINDS
    (sampled, temperature 1, top-p 0.95, seeded): subjects of the kinds facts are about, which the model
    holds facts of, with no data file. They keep more of other subjects' answers than vocab:N's made-up
    names (docs/hyperparameters.md and docs/benchmarks.md, "Session 19"). Rounds stop when `count`
    distinct names are found, or after `count` prompts (a model that lists nothing usable fails with the
    fix)."""
    from tqdm.auto import tqdm

    prompts = [f"Here is a list of well-known {k}:\n1." for k in NAME_KINDS]
    seqs = [tok(p)["input_ids"] for p in prompts]
    width, pad = max(map(len, seqs)), pad_id(tok)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    device = model.get_input_embeddings().weight.device
    found: dict[str, None] = {}
    rounds = max(1, -(-count // len(NAME_KINDS)))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            tqdm(total=count, desc="neighbour names", unit="name", disable=not progress) as bar:
        torch.manual_seed(seed)
        for _ in range(rounds):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=_LIST_NEW_TOKENS,
                                 pad_token_id=pad)
            for row in out[:, width:]:
                for name in _listed_names(tok.decode(row, skip_special_tokens=True)):
                    if name not in found and len(found) < count:
                        found[name] = None
                        bar.update()
            if len(found) >= count:
                break
    if len(found) < 2:
        raise MemitError(f"--neighbour-subjects model:{count}: the model listed {len(found)} usable names; give "
                         "--neighbour-subjects FILE (or vocab:N)")
    return list(found)


def generated_names(kind: str, count: int, model, tok, seed: int, cache_root: Path, model_id: str,
                    progress: bool = False) -> list[str]:
    """The names of a `vocab:N` or `model:N` spec (generated_subjects), model:N's cached by `model_id`."""
    if kind == "vocab":
        return vocabulary_subjects(tok, count, seed)
    return cached_model_subjects(cache_root, model_id, model, tok, count, seed, progress)


def cached_model_subjects(cache_root: Path, model_id: str, model, tok, count: int, seed: int,
                          progress: bool = False) -> list[str]:
    """model_subjects, kept under the cache dir by the model's fingerprint `model_id` (a JSON list, written
    atomically): one model's names are listed once (minutes on a CPU); a damaged cache file is listed again."""
    cache = Path(cache_root) / "subjects" / model_id[:24] / f"model{count}-seed{seed}.json"
    try:  # only a plain file of a sane size is read back (not a link to /dev/zero, not a huge file)
        if cache.is_file() and not cache.is_symlink() and cache.stat().st_size <= _CACHE_BYTES:
            names = json.loads(cache.read_text())
            if isinstance(names, list) and names and all(isinstance(n, str) and n for n in names):
                return names
    except (OSError, ValueError):
        pass
    names = model_subjects(model, tok, count, seed, progress)
    with atomic_file(cache) as tmp:
        tmp.write_text(json.dumps(names, indent=0))
    return names


@dataclass(frozen=True)
class Preserved:
    """One layer's preserved terms of the solve: `gram` = sum of w k k^T [d_ff, d_ff] (float64), and `pull`
    = sum of w r k^T [d_model, d_ff] over the keys of restored prompts and corpus tokens (r the share of
    their way back to the anchored output that this layer delivers), None when nothing is restored."""

    gram: torch.Tensor
    pull: torch.Tensor | None = None


class PreservedKeys:
    """The preserved terms per layer, read on demand (layers in increasing order, as the update loop goes).
    `prompts` at `prompt_weight`, `own` (own_prompts) at `own_weight`. With `z_layer` and `restore_prompts`
    (HParams.preserve_restore) both are pulled back to their outputs at z_layer before the update instead of
    held; `corpus` (token id batches of ordinary text:
    HParams.corpus_restore_tokens) is pulled back the same way at `corpus_weight` (lambda) times the mean
    over its tokens, as lambda C = lambda E[k k^T] weighs them, with no term of its own in the gram
    (lambda C holds the corpus already). Built on the model being edited (a stack merged), before the
    update (restore.AnchoredTexts)."""

    def __init__(self, em, tok, requests: list[EditRequest], groups: list[list[str]],
                 prompts: list[PreservePrompt], batch_prompts: int, prompt_weight: float = 1.0,
                 recorded: LineageKeys | None = None, z_layer: int | None = None, restore_prompts: bool = False,
                 corpus: list[tuple[torch.Tensor, torch.Tensor]] = (), corpus_weight: float = 0.0,
                 overhead_tokens: float = BUCKET_OVERHEAD_TOKENS, own: list[PreservePrompt] = (),
                 own_weight: float = 0.0):
        from .memit import KeyReader  # the same reader as the edit keys

        self.em, self.prompt_weight, self.own_weight = em, prompt_weight, own_weight
        self.recorded = recorded if recorded and recorded.count else None
        self.facts = KeyReader(em, tok, requests, groups, batch_prompts, overhead_tokens) if requests else None
        texts = partial(_prompt_texts, em, tok, batch_prompts=batch_prompts, overhead_tokens=overhead_tokens,
                        z_layer=z_layer if restore_prompts else None)
        self.prompts, self.own = texts(prompts), texts(own)
        self.corpus = AnchoredTexts(em, list(corpus), z_layer) if corpus else None
        self.corpus_weight = corpus_weight / self.corpus.tokens if self.corpus else 0.0  # per token
        self.count = len(requests) + (self.recorded.count if self.recorded else 0) + self.prompts.tokens + \
            self.own.tokens

    def __bool__(self) -> bool:
        return self.count > 0 or self.corpus is not None

    @torch.no_grad()
    def at(self, layer: int, share: float = 1.0) -> Preserved:
        """The terms at `layer`, read on the model as updated so far; `share`: the part of the remaining
        way back to the anchored outputs that this layer is to deliver (1 / the edited layers left, as for the
        edits' residuals)."""
        device = self.em.device_of(layer)
        total = torch.zeros(self.em.d_ff, self.em.d_ff, dtype=torch.float64, device=device)
        pull = torch.zeros(self.em.d_model, self.em.d_ff, dtype=torch.float64, device=device)
        if self.facts is not None:
            k, _ = self.facts.read(layer, None)
            total += (k.double().T @ k.double()).to(device)
        if self.recorded is not None:
            k = self.recorded.at(layer).to(device, torch.float64)
            total += k.T @ k
        for texts, weight in ((self.prompts, self.prompt_weight), (self.own, self.own_weight)):
            for k, r in texts.read(layer, share):
                total += weight * (k.T @ k)
                if r is not None:
                    pull += weight * (r @ k)
        for k, r in self.corpus.read(layer, share) if self.corpus else ():
            pull += self.corpus_weight * (r @ k)
        pulled = self.prompts.z_layer is not None or self.corpus is not None
        return Preserved(total, pull if pulled else None)


def _prompt_texts(em, tok, prompts: list[PreservePrompt], batch_prompts: int, overhead_tokens: float,
                  z_layer: int | None) -> AnchoredTexts:
    """The prompts (and their answers but the last token) as length-batched AnchoredTexts, each prompt's
    `skip` position left unread."""
    seqs = [tok(p.prompt)["input_ids"] + (target_ids(tok, p.answer)[:-1] if p.answer else []) for p in prompts]
    parts = length_batches(torch.tensor([len(s) for s in seqs], dtype=torch.long), batch_prompts, overhead_tokens)
    batches = [pad_right([seqs[i] for i in part], pad_id(tok)) for part in parts]
    keep = [mask.clone() for _, mask in batches]
    for part, k in zip(parts, keep):
        for row, i in enumerate(part.tolist()):
            if prompts[i].skip is not None:
                k[row, prompts[i].skip] = 0
    return AnchoredTexts(em, batches, z_layer, keep)


def preserved_keys(em, tok, hp: HParams, facts: list[EditRequest], groups: list[list[str]],
                   prompts: list[PreservePrompt], batch_prompts: int, recorded: LineageKeys | None = None,
                   corpus: Corpus | None = None, overhead_tokens: float = BUCKET_OVERHEAD_TOKENS,
                   edits: list[EditRequest] = ()) -> PreservedKeys:
    """PreservedKeys as `hp` asks (weights, what is restored; the first hp.corpus_restore_tokens tokens of
    `corpus` pulled back at lambda; with hp.own_prompt_weight, the own prompts of `edits`). On the model
    being edited, before the update."""
    batches = [pad_right(b, pad_id(tok)) for b in token_batches(tok, corpus, hp.corpus_restore_tokens)] \
        if hp.corpus_restore_tokens else []
    return PreservedKeys(em, tok, facts, groups, prompts, batch_prompts, hp.preserve_weight, recorded,
                         z_layer=hp.layers[-1], restore_prompts=hp.preserve_restore, corpus=batches,
                         corpus_weight=hp.mom2_update_weight, overhead_tokens=overhead_tokens,
                         own=own_prompts(tok, edits) if hp.own_prompt_weight else [],
                         own_weight=hp.own_prompt_weight)
