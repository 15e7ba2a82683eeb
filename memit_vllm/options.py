"""Command-line options that several commands share, defined once so they read and behave the same."""

from __future__ import annotations

import sys

import click

from .core.records import ZSRE_TARGETS
from .evaluate.generation import UNRELATED_PROMPTS

zsre_target_option = click.option(
    "--zsre-target", type=click.Choice(ZSRE_TARGETS), default="answers", show_default=True,
    help="zsRE: the target is answers[0] (as MEMIT's code) or alt (as the editing toolkits).")


class _Seed(click.ParamType):
    """An integer torch takes as a seed (64 bits): a larger --seed raised OverflowError after the model loaded."""

    name = "integer"

    def convert(self, value, param, ctx):
        seed = click.INT.convert(value, param, ctx)
        if not -(1 << 63) <= seed < 1 << 64:
            self.fail(f"{seed} does not fit in 64 bits; give one in -2**63..2**64-1", param, ctx)
        return seed


SEED = _Seed()

unrelated_count_option = click.option(
    "--unrelated-count", type=click.IntRange(min=1), default=None, metavar="N",
    help=f"How many unrelated prompts the records after the first N give (default {UNRELATED_PROMPTS}: a share "
         "of 100 prompts is known to about +-10 points; 1,000 to +-3). Not with --unrelated.")


def progress_shown(as_json: bool) -> bool:
    """Progress bars (on stderr) beside the text report, and beside --json's report on stdout where a person
    watches stderr (a terminal): a long job piped into a reader still shows that it runs."""
    return not as_json or sys.stderr.isatty()
