"""Finished z batches kept on disk (make-patch --resume-dir), so a long run that stops (killed, out of
time, out of memory) resumes where it stopped instead of starting over: the z optimisation is ~95% of
an edit's time, and 10,000 edits take hours on a CPU.

A batch's file is named by the hash of everything its z vectors depend on (the weights being edited,
the z hyperparameters, the context templates, the layer, the dtypes and device kind) and of its
requests, in order. So a rerun with other settings, requests or a changed batching finds nothing and
computes afresh; no file is ever trusted for more than its name promises. A damaged or foreign file is
recomputed with a warning, never fatal, read as the covariance cache's entries are (covariance.read_checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.files import atomic_file, check_can_create
from ..core.records import EditRequest
from ..errors import MemitError
from .covariance import read_checked
from .hparams import HParams

FORMAT = "memit-vllm z batch 1"
# What z depends on besides the model, the templates and the layer (the update's settings do not count:
# a rerun with another lambda, method or preserve set reuses the z vectors).
Z_HPARAMS = ("v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "v_early_stop_loss",
             "v_early_stop", "z_dtype")
STORED = ("z", "delta", "final_loss", "target_prob", "steps")  # the fields of targets.TargetResult that are kept


def check_resume_dir(folder: str | os.PathLike) -> Path:
    """`folder` exists as a writable directory, or can be made: checked before the model loads."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MemitError(f"--resume-dir {folder} is not a directory; give a directory for the finished z batches")
    check_can_create(folder, f"--resume-dir {folder}")
    return folder


def z_identity(model: str, made_on: list[str], dtype: str, hp: HParams, templates: list[str], layer: int,
               device: torch.device, fisher_corpus: str | None = None) -> dict:
    """Everything a batch's z vectors depend on besides its requests (`model`: the base weights' hash,
    `made_on`: the ids of the patches merged on it, `fisher_corpus`: the corpus of the z penalty's F)."""
    identity = {"format": FORMAT, "model": model, "made_on": made_on, "dtype": dtype, "layer": layer,
                "templates": templates, "device": torch.device(device).type,
                "hparams": {k: getattr(hp, k) for k in Z_HPARAMS}}
    if hp.v_optimizer != "adam":  # named only when not the reference's, as the penalty below
        identity["optimizer"] = {"name": hp.v_optimizer, "step": hp.v_step}
    if hp.reads_fisher:  # named only when on, so the batches of runs without the penalty keep their names
        identity["fisher"] = {"weight": hp.z_fisher_weight, "tokens": hp.z_fisher_tokens, "corpus": fisher_corpus,
                              "layers": hp.layers}
    return identity


class TargetStore:
    """The z results of finished batches in `folder`, one safetensors file each."""

    def __init__(self, folder: str | os.PathLike, identity: dict):
        self.folder = Path(folder)
        self.identity = json.dumps(identity, sort_keys=True)

    def _file(self, requests: list[EditRequest]) -> tuple[Path, str]:
        key = json.dumps([r.to_dict() for r in requests], sort_keys=True)
        digest = hashlib.sha256(f"{self.identity}\n{key}".encode()).hexdigest()
        return self.folder / f"z-{digest[:32]}.safetensors", digest

    def load(self, requests: list[EditRequest], d_model: int) -> dict[str, torch.Tensor] | None:
        """The stored results (STORED) of this batch, or None when there are none (or they are unsound: a
        warning)."""
        path, digest = self._file(requests)
        if not path.exists() and not path.is_symlink():
            return None
        n = len(requests)
        if path.is_symlink() or not path.is_file():
            problem = "it is not a regular file"
        elif path.stat().st_size > 2 * n * (d_model + 4) * 8 + (1 << 20):  # far more than n z rows could need
            problem = f"it is {path.stat().st_size} bytes, more than {n} z vectors need"
        else:
            got, problem = read_checked(path, {"identity": self.identity, "requests": digest}, STORED, (n, d_model))
            if got is not None and any(t.shape[0] != n for t in got.values()):
                got, problem = None, f"its shapes do not fit {n} edits"
        if problem:
            warnings.warn(f"resume file {path}: {problem}; recomputing its batch", stacklevel=3)
            return None
        return got

    def save(self, requests: list[EditRequest], result) -> None:
        path, digest = self._file(requests)
        tensors = {name: getattr(result, name).detach().cpu().contiguous() for name in STORED}
        try:
            with atomic_file(path) as tmp:
                save_file(tensors, str(tmp), metadata={"identity": self.identity, "requests": digest})
        except OSError as e:
            raise MemitError(f"--resume-dir {self.folder}: cannot write {path.name} ({e.strerror or e}); the batches "
                             "finished before it are kept: make room and run the same command again") from e
