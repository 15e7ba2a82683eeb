"""Keys whose outputs an update must leave alone: the facts of earlier patches in the lineage
(`make-patch --on`), the user's `--preserve` prompts, and the edits' prompts asked of other subjects
(`--neighbour-subjects`).

Their summed outer products K_p K_p^T join the layer solve (solve.py). For a lineage fact, the key at its
subject's last token averaged over the context templates (how it was inserted), as read on the model its
own patch left (cached: lineage_keys.py; hparams lineage_keys "current": re-read on the model as updated
so far, like the edit keys). For a --preserve prompt, read at each layer on the model as updated so far,
the key at every position of the prompt and of its answer but the last (every position whose output the
answer depends on), each weighted by HParams.preserve_weight (an edit key counts 1).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import torch

from ..core.records import EditRequest, read_prompts, target_text
from ..core.tokens import pad_id, pad_right, target_ids
from ..errors import MemitError
from .lineage_keys import LineageKeys
from .trace import UpwardReads


@dataclass(frozen=True)
class PreservePrompt:
    prompt: str
    answer: str | None = None  # with its leading space, as it follows the prompt


def read_preserve_file(path) -> list[PreservePrompt]:
    """The prompts of a --preserve file (core.records.read_prompts: prompt strings or {"prompt", "answer"})."""
    out = []
    for p in read_prompts(path, "--preserve"):
        answer = target_text(p["answer"], "answer", f"--preserve {path}") if p["answer"] else None
        out.append(PreservePrompt(p["prompt"], answer if answer is None or answer.startswith(" ") else " " + answer))
    return out


def neighbour_prompts(requests: list[EditRequest], subjects: list[str], per_edit: int, seed: int,
                      source: str = "--neighbour-subjects") -> list[PreservePrompt]:
    """Each edit's prompt asked of `per_edit` other subjects (a seeded sample of `subjects`, never one
    being edited). An update learns "this relation -> the new object" for any subject whose key resembles
    the edited ones; in the solve these keys say what it must leave alone (docs/hyperparameters.md,
    "Drift"). `source` names where `subjects` came from, in messages."""
    edited = {r.subject for r in requests}
    pool = sorted(set(subjects) - edited)
    if not pool:
        raise MemitError(f"{source}: every subject in it is being edited; give other subjects")
    rnd = random.Random(seed)
    return [PreservePrompt(replace(r, subject=s).text()) for r in requests
            for s in rnd.sample(pool, min(per_edit, len(pool)))]


_NAME_WORD = re.compile(r" [A-Z][a-z]{3,}")
VOCABULARY = "vocab:"  # --neighbour-subjects vocab:N: N made-up names instead of a file (vocabulary_subjects)


def vocabulary_count(spec) -> int | None:
    """N of a `vocab:N` --neighbour-subjects, None when `spec` names a file (checked before any model loads)."""
    if not isinstance(spec, str) or not spec.startswith(VOCABULARY):
        return None
    n = spec[len(VOCABULARY):]
    if not n.isdigit() or int(n) < 1:
        raise MemitError(f"--neighbour-subjects {spec!r}: expected vocab:N with N an integer >= 1 (e.g. vocab:2000), "
                         "or a file of subject names")
    return int(n)


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


class PreservedKeys:
    """K_p K_p^T per layer, read on demand (layers in increasing order, as the update loop goes)."""

    def __init__(self, em, tok, requests: list[EditRequest], groups: list[list[str]],
                 prompts: list[PreservePrompt], batch_prompts: int, prompt_weight: float = 1.0,
                 recorded: LineageKeys | None = None):
        from .memit import KeyReader  # the same reader as the edit keys

        self.em, self.prompt_weight = em, prompt_weight
        self.recorded = recorded if recorded and recorded.count else None
        self.facts = KeyReader(em, tok, requests, groups, batch_prompts) if requests else None
        seqs = [tok(p.prompt)["input_ids"] + (target_ids(tok, p.answer)[:-1] if p.answer else []) for p in prompts]
        self.prompts = UpwardReads(em, [pad_right(seqs[i:i + batch_prompts], pad_id(tok))
                                        for i in range(0, len(seqs), batch_prompts)])
        self.count = len(requests) + (self.recorded.count if self.recorded else 0) + sum(len(s) for s in seqs)

    def __bool__(self) -> bool:
        return self.count > 0

    @torch.no_grad()
    def at(self, layer: int) -> torch.Tensor:
        total = torch.zeros(self.em.d_ff, self.em.d_ff, dtype=torch.float64, device=self.em.device_of(layer))
        if self.facts is not None:
            k, _ = self.facts.read(layer, None)
            total += (k.double().T @ k.double()).to(total.device)
        if self.recorded is not None:
            k = self.recorded.at(layer).to(total.device, torch.float64)
            total += k.T @ k
        for b, got in self.prompts.read(layer):
            mask = self.prompts.batches[b][1].bool()
            k = got.keys[layer][mask.to(got.keys[layer].device)].to(total.device, torch.float64)
            total += self.prompt_weight * (k.T @ k)
        return total
