"""The patch-file commands of the CLI: inspect, verify, apply, stack, diff (thin shells over tools.py).

Errors are PatchError/MemitError: the main group prints them as one line and exits 2.
"""

from __future__ import annotations

import json

import click


def _echo_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _norm(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


@click.command("inspect")
@click.argument("patch")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(patch: str, as_json: bool) -> None:
    """Show what PATCH holds: ids, base model, facts, per-layer delta norm and numerical rank."""
    from ..core.records import fact_text
    from .tools import inspect_patch

    r = inspect_patch(patch)
    if as_json:
        return _echo_json(r)
    base = r["base"]
    click.echo(f"patch     {r['path']} ({r['file_size']:,} bytes, format v{r['format_version']})")
    click.echo(f"id        {r['patch_id']}")
    click.echo(f"label     {r['name'] or '-'} {r['version']}".rstrip())
    click.echo(f"created   {r['created']} by memit-vllm {r['tool_version']}")
    if r["parents"]:
        click.echo(f"parents   {', '.join(r['parents'])}")
    if r["made_on"]:
        click.echo(f"made on   {' -> '.join(r['made_on'])} (serve after exactly these, in this order)")
    click.echo(f"base      {base['name_or_path']} ({base['architecture']}, config {base['config_sha256'][:12]})")
    click.echo(f"layers    {len(r['layers'])}")
    for layer in r["layers"]:
        click.echo(f"  {layer['name']}  {'x'.join(map(str, layer['shape']))}  "
                   f"norm {layer['norm']:.4g}  rank {layer['rank']}")
    click.echo(f"facts     {r['n_facts']}")
    for fact in r["facts"]:
        click.echo(f"  {fact_text(fact)}")


@click.command("verify")
@click.argument("patches", nargs=-1, required=True)
@click.option("--model", "-m", required=True, help="Checkpoint dir (or HF hub id) the patch is meant for.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="The dtype the model will be served in: merged weights must be finite in it "
                   "(default: the checkpoint's).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify_cmd(patches: tuple[str, ...], model: str, dtype: str | None, as_json: bool) -> None:
    """Check PATCHES (one patch, or a stack in serving order) against MODEL: content hash, down-projections
    only, the lineage, and every tensor's base fingerprint, shape, dtype, and values (finite, also merged).

    Exit 0 when all hold; otherwise a one-line error naming the first problem, exit 2.
    """
    from .tools import verify_patch

    r = verify_patch(list(patches), model, dtype)
    if as_json:
        return _echo_json(r)
    for pid in r["stack"]:
        click.echo(f"patch {pid}: content hash ok, all deltas finite")
    for t in r["tensors"]:
        click.echo(f"  ok  {t['name']}  {'x'.join(map(str, t['shape']))} {t['weight_dtype']}  fingerprint matches")
    if not r["config_matches"]:
        click.echo("warning: the model's config.json differs from the one the patch was made with "
                   "(the weights match)", err=True)
    click.echo(f"verified against {r['model']}")


@click.command("apply")
@click.argument("patches", nargs=-1, required=True)
@click.option("--model", "-m", required=True, help="The base checkpoint dir (or HF hub id).")
@click.option("--out", "out", required=True, help="New checkpoint dir to write (must not exist).")
def apply_cmd(patches: tuple[str, ...], model: str, out: str) -> None:
    """Merge PATCHES (in order) into MODEL and write a standalone HF checkpoint to OUT; prints OUT last."""
    from .format import load_patch
    from .tools import apply_patches

    click.echo(str(apply_patches([load_patch(p, verify_content=True) for p in patches], model, out)))


@click.command("stack")
@click.argument("patches", nargs=-1, required=True)
@click.option("--output", "-o", required=True, help="Where to write the stacked patch.")
@click.option("--name", default="", help="Name label of the new patch (default: the parents' names joined).")
@click.option("--version", "version", default="", help="Version label of the new patch.")
def stack_cmd(patches: tuple[str, ...], output: str, name: str, version: str) -> None:
    """Combine PATCHES into one patch equal to applying them in order (same base model required)."""
    from ..core.files import check_out_file
    from .format import load_patch
    from .tools import stack_patches

    check_out_file(output, "--output")
    stacked = stack_patches([load_patch(p, verify_content=True) for p in patches], name=name, version=version)
    stacked.save(output)
    click.echo(f"{stacked.patch_id}  {output}")


@click.command("diff")
@click.argument("patch_a")
@click.argument("patch_b")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def diff_cmd(patch_a: str, patch_b: str, as_json: bool) -> None:
    """Compare two patches: facts added (+), removed (-), changed (~), and per-tensor differences."""
    from .format import load_patch
    from .tools import diff_patches

    r = diff_patches(load_patch(patch_a, verify_content=True), load_patch(patch_b, verify_content=True))
    if as_json:
        return _echo_json(r)
    click.echo(f"a {r['a']['patch_id']} {r['a']['path']}\nb {r['b']['patch_id']} {r['b']['path']}")
    if not r["same_base"]:
        click.echo("warning: the patches were made for different base models", err=True)
    for fact in r["facts_added"]:
        click.echo(f"+ {fact}")
    for fact in r["facts_removed"]:
        click.echo(f"- {fact}")
    for c in r["facts_changed"]:
        click.echo(f"~ {c['a']}  =>  {c['b']}")
    for t in r["tensors"]:
        click.echo(f"  {t['name']}  in {t['in']}  |a| {_norm(t['norm_a'])}  |b| {_norm(t['norm_b'])}  "
                   f"|b-a| {_norm(t['diff_norm'])}")


PATCH_COMMANDS = (inspect_cmd, verify_cmd, apply_cmd, stack_cmd, diff_cmd)
