"""Command-line options that several commands share, defined once so they read and behave the same."""

from __future__ import annotations

import click

from .core.records import ZSRE_TARGETS

zsre_target_option = click.option(
    "--zsre-target", type=click.Choice(ZSRE_TARGETS), default="answers", show_default=True,
    help="zsRE: the target is answers[0] (as MEMIT's code) or alt (as the editing toolkits).")
