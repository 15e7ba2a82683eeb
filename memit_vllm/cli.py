"""The `memit-vllm` command line. Each command is a thin shell over the library."""

from __future__ import annotations

import sys

import click

from .errors import MemitError, one_line


class _Group(click.Group):
    """Turns MemitError, and an OSError that names its path (a name too long, a loop of links, a
    permission, a full disk), into a one-line message and exit code 2 (traceback only with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (MemitError, OSError) as e:
            if ctx.find_root().params.get("debug") or (isinstance(e, OSError) and e.filename is None):
                raise
            message = e if isinstance(e, MemitError) else one_line(f"cannot use {e.filename}: {e.strerror}")
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="memit-vllm")
def main(debug: bool) -> None:
    """Edit facts in a language model with MEMIT and serve the edits with vLLM."""


@main.group()
def model() -> None:
    """The embedded default models."""


@model.command("prepare")
@click.argument("name")
def model_prepare(name: str) -> None:
    """Build (once) the checkpoint dir of a known model NAME and print its path last."""
    from .default_models import prepare

    click.echo(str(prepare(name)))


@model.command("list")
def model_list() -> None:
    """List the known default models."""
    from .default_models import KNOWN_MODELS

    for spec in KNOWN_MODELS.values():
        click.echo(f"{spec.name}\t{spec.description}")


def _register_commands() -> None:
    """Each room's click shell; they import their heavy parts (torch, transformers) only when run, so
    `memit-vllm --help` stays fast."""
    from .ab import ab_command
    from .editor.command import make_patch_command
    from .editor.stats_command import stats_group
    from .evaluate.command import eval_command
    from .lora_export import export_lora_command
    from .patch.commands import PATCH_COMMANDS
    from .serve import serve

    for command in (make_patch_command, stats_group, *PATCH_COMMANDS, serve, eval_command, ab_command,
                    export_lora_command):
        main.add_command(command)


_register_commands()
