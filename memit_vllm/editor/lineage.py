"""Editing on top of earlier patches (`make-patch --on A.patch --on B.patch`).

The editor loads base + that stack, so the new update is solved on the model that will serve it; the
new patch holds only its own deltas (still additive to the base weights, fingerprints still of the base)
and records the stack's ids in `made_on`, which every consumer checks (patch/merge.py check_lineage).
A request for a fact the lineage already edited (same prompt and subject) changes that fact; withdrawing
a fact is an edit back to the answer the base model gave (the earliest recorded target_true).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..core.records import EditRequest, parse_record
from ..errors import MemitError
from ..patch import Patch, load_patch
from ..patch.merge import PatchSet


def load_stack(on: list, ckpt: Checkpoint) -> list[Patch]:
    """The patches to edit on, content-verified and checked as a stack against the checkpoint."""
    stack = [p if isinstance(p, Patch) else load_patch(Path(p), verify_content=True) for p in on]
    if stack:
        PatchSet(stack).validate(ckpt)
    return stack


@torch.no_grad()
def merge_stack(em, ckpt: Checkpoint, stack: list[Patch]) -> None:
    """Set every weight the stack touches to base + its deltas (the same merge as the server's)."""
    if not stack:
        return
    ps = PatchSet(stack)
    for name in ps.names:
        em.set_weight(em.arch.layer_of(name), ps.merge(name, ckpt.tensor(name)))


def patch_requests(p: Patch) -> list[EditRequest]:
    """A patch's recorded requests, parsed (in their order: the rows of its cached keys, lineage_keys.py)."""
    return [parse_record(rec, f"patch {p.name or p.patch_id} request {i}") for i, rec in enumerate(p.requests)]


def lineage_facts(stack: list[Patch]) -> list[EditRequest]:
    """Every fact the stack edited, as it stands after the whole stack: a later patch's request for the
    same fact replaces the earlier one, keeping the earliest recorded target_true (the base's answer)."""
    facts: dict[tuple[str, str], EditRequest] = {}
    for p in stack:
        for r in patch_requests(p):
            old = facts.get(r.fact)
            facts[r.fact] = replace(r, target_true=old.target_true or r.target_true) if old else r
    return list(facts.values())


def changed_facts(requests: list[EditRequest], lineage: list[EditRequest]) -> list[str]:
    """'fact: old -> new' for each request that changes a fact the lineage edited."""
    old = {r.fact: r for r in lineage}
    return [f"{r.text()}:{old[r.fact].target_new} ->{r.target_new}" for r in requests
            if r.fact in old and old[r.fact].target_new != r.target_new]


def withdrawal_requests(stack: list[Patch], selectors: list[str]) -> list[EditRequest]:
    """Requests restoring the base model's answer for the lineage facts whose subject or case id is one
    of `selectors`."""
    if not stack:
        raise MemitError("--withdraw needs the patches that made the facts: give them with --on")
    facts = lineage_facts(stack)
    picked = [f for f in facts if f.subject in selectors or (f.case_id is not None and f.case_id in selectors)]
    unmatched = [s for s in selectors if not any(s in (f.subject, f.case_id) for f in picked)]
    if unmatched:
        raise MemitError(f"--withdraw {unmatched[0]!r}: no fact of the --on patches has that subject or case id")
    unknown = [f for f in picked if not f.target_true]
    if unknown:
        raise MemitError(f"cannot withdraw {unknown[0].text()!r}: its patch records no target_true (the base "
                         "model's answer); edit it back with --requests instead")
    return [replace(f, target_new=f.target_true, target_true=f.target_new) for f in picked]
