"""Applying patches to base weights, and the one validation of a patch or a stack that every entry point
runs (verify, apply, stack, eval, export-lora, serve's pre-check, the vLLM loader, hot apply, variants).

A PatchSet is only built from patches whose content checks out (Patch.verify: id, finite deltas), in a
valid order (no patch twice, lineage); `check_model` allows only the architecture's down-projections;
`merge` checks each weight's fingerprint, shape and dtype and that the merged weight is finite in the
dtype it is served in. Every patch binds to the base checkpoint's own weights (fingerprints), so a stack
P1..Pn is checked weight by weight against the same base and merged as W + d1 + ... + dn in fp32, then
cast back to the weight's dtype once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checkpoint import Checkpoint, tensor_fingerprint
from ..core.architectures import by_class
from .errors import BaseMismatchError, LineageError, NonFiniteError, PatchError, ShapeMismatchError
from .format import Patch, where


class PatchSet:
    """An ordered stack of patches for one base model."""

    def __init__(self, patches: Sequence[Patch], dtype: torch.dtype | None = None):
        """`dtype`: the dtype the merged weights are served in (default: each checkpoint weight's own)."""
        if not patches:
            raise PatchError("no patches given")
        self.patches = list(patches)
        self.dtype = dtype
        for p in self.patches:
            p.verify()
        first = self.patches[0]
        for p in self.patches[1:]:
            if (p.base.architecture, p.base.config_sha256) != (first.base.architecture, first.base.config_sha256):
                raise BaseMismatchError(
                    f"{_label(p)} is for {p.base.architecture} ({p.base.name_or_path}), {_label(first)} for "
                    f"{first.base.architecture} ({first.base.name_or_path}): patches in one stack must share a "
                    "base model")
            for name in set(p.deltas) & set(first.deltas):
                if p.base_weights[name] != first.base_weights[name]:
                    raise BaseMismatchError(
                        f"{_label(p)} and {_label(first)} were made for different base weights {name!r}: "
                        "patches in one stack must share a base model")
        check_lineage(self.patches)
        self.names = sorted({n for p in self.patches for n in p.deltas})

    def touches(self, name: str) -> bool:
        return any(name in p.deltas for p in self.patches)

    def check_model(self, architecture: str) -> None:
        """Every patch is for `architecture`, and changes only its MLP down-projections (the table's)."""
        for p in self.patches:
            if p.base.architecture != architecture:
                raise BaseMismatchError(
                    f"{_label(p)} was made for {p.base.architecture} ({p.base.name_or_path}), "
                    f"not {architecture}: use a patch made for this model")
        arch = by_class(architecture)
        for p in self.patches:
            other = [n for n in p.deltas if arch.layer_of(n) is None]
            if other:
                raise PatchError(f"{_label(p)} changes {other[0]!r}, which is not an MLP down-projection of "
                                 f"{architecture} (*.{arch.down_proj}.weight): patches edit only those")

    def check_names(self, names: set[str] | Sequence[str]) -> None:
        missing = [n for n in self.names if n not in set(names)]
        if missing:
            raise BaseMismatchError(
                f"the model has no weight {missing[0]!r} that {_label(self._owner(missing[0]))} patches: "
                "the patch was made for another model")

    def merge(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """Check every patch touching `name` against `base`, then return base + deltas in base.dtype."""
        fingerprint = None
        out = None
        for p in self.patches:
            if name not in p.deltas:
                continue
            fingerprint = fingerprint or tensor_fingerprint(base)
            if p.base_weights.get(name) != fingerprint:
                raise BaseMismatchError(
                    f"{_label(p)}: weight {name!r} differs from the base the patch was made for "
                    f"(fingerprint {fingerprint[:12]} != {str(p.base_weights.get(name))[:12]}): "
                    "use a patch made for this exact checkpoint")
            delta = p.deltas[name]
            if tuple(delta.shape) != tuple(base.shape):
                raise ShapeMismatchError(
                    f"{_label(p)}: delta {name!r} has shape {tuple(delta.shape)}, the weight {tuple(base.shape)}")
            if not base.is_floating_point():
                raise ShapeMismatchError(
                    f"{_label(p)}: weight {name!r} is {base.dtype}; patches add to floating-point weights only")
            out = (base.to(torch.float32) if out is None else out) + delta.to(torch.float32)
        if out is None:
            return base
        self.check_finite(name, out, self.dtype or base.dtype)
        return out.to(base.dtype)

    def check_finite(self, name: str, merged: torch.Tensor, dtype: torch.dtype) -> None:
        """A merged weight (or a stacked delta) must stay finite in the dtype it is served or stored in:
        each delta may be finite and their sum, or the weight plus a large delta, not."""
        if not torch.isfinite(merged.to(dtype)).all():
            owners = ", ".join(_label(p) for p in self.patches if name in p.deltas)
            raise NonFiniteError(f"{owners}: {name!r} overflows {str(dtype).removeprefix('torch.')} when "
                                 "merged (a delta is too large for the weight's dtype)")

    def validate(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """Full check against a checkpoint on disk (reads each touched weight once); returns each touched
        weight's base tensor metadata as {name: empty tensor of its shape and dtype}."""
        self.check_model(checkpoint.architecture)
        self.check_names(set(checkpoint.keys()))
        checked = {}
        for name in self.names:
            base = checkpoint.tensor(name)
            self.merge(name, base)
            checked[name] = base.new_empty(base.shape, device="meta")
        return checked

    def _owner(self, name: str) -> Patch:
        return next(p for p in self.patches if name in p.deltas)


def check_lineage(patches: Sequence[Patch]) -> None:
    """No patch twice, and each patch made on a stack (`made_on`) comes right after exactly that stack:
    its update was solved on base + those patches, so without them (or in another order) it is another edit."""
    ids = [p.patch_id for p in patches]
    for i, p in enumerate(patches):
        if p.patch_id in ids[:i]:
            raise LineageError(f"{_label(p)} is given twice; a stack holds each patch once")
        if p.made_on and p.made_on != ids[:i]:
            missing = [m for m in p.made_on if m not in ids[:i]]
            names = {q.patch_id: _label(q) for q in patches}
            order = ", ".join(names.get(m, f"patch {m}") for m in [*p.made_on, p.patch_id])
            raise LineageError(
                f"{_label(p)} was made on the stack {p.made_on}"
                + (f", and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing" if missing else
                   f", but is given after {ids[:i] or 'nothing'}")
                + f": give exactly, in this order: {order}")


def _label(p: Patch) -> str:
    return f"patch {p.name or p.patch_id}" + (f" ({where(p.path)})" if p.path else "")
