"""`memit-vllm eval`: the click shell over `run.evaluate` and the report (heavy imports deferred)."""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

from ..core.files import check_report_outputs
from ..core.records import FORMATS
from ..options import unrelated_count_option, zsre_target_option
from .generation import HELDOUT_TEXTS, NEW_TOKENS


@click.command("eval")
@click.option("--model", "model", required=True, help="Checkpoint dir, HF hub id, or a default model name.")
@click.option("--patch", "patches", multiple=True, help="Patch file to merge (repeat to stack, in order).")
@click.option("--data", required=True, help="CounterFact (full or EasyEdit layout) or zsRE JSON file.")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Use the first N records (default: all).")
@click.option("--format", "fmt", type=click.Choice(("auto", *FORMATS)), default="auto", show_default=True,
              help="Data layout; auto detects it from the first record.")
@zsre_target_option
@click.option("--fluency", is_flag=True, help="Also measure GE on greedy 100-token generations (slow).")
@click.option("--generate", is_flag=True, help="Also the generated metrics: greedy completions of the rewrite, "
              "paraphrase, neighbour and unrelated prompts, and the next-token KL on held-out text.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=NEW_TOKENS, show_default=True,
              help="--generate: greedy tokens per completion.")
@click.option("--unrelated", default=None, metavar="FILE", help="--generate: prompts (JSON list / JSONL of strings "
              "or {prompt}) that no edit concerns (default: the edit prompts of the records after the first N).")
@unrelated_count_option
@click.option("--heldout", default=None, metavar="FILE", help="--generate: .txt/.jsonl text for the KL, of which "
              f"the last {HELDOUT_TEXTS} texts are used (default: ../shared/data/corpus/smollm2_self_2k.jsonl).")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[PATH]",
              help="Write every metric as JSON to PATH, or to stdout (instead of the table) without PATH.")
@click.option("--plot", "plot_out", default=None, metavar="PNG", help="Write a before/after bar chart.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequences per forward pass.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--backend", type=click.Choice(("transformers", "vllm")), default="transformers", show_default=True,
              help="Score in memory (transformers) or through running vLLM servers (--server, --base-server).")
@click.option("--server", default=None, metavar="URL[:MODEL]",
              help="vllm backend: a server serving MODEL with exactly the --patch stack (e.g. `memit-vllm serve`); "
                   ":MODEL picks one of its models (a --memit-variant).")
@click.option("--base-server", default=None, metavar="URL[:MODEL]",
              help="vllm backend: a server serving MODEL without patches, for the 'before' column.")
def eval_command(model, patches, data, n, fmt, zsre_target, fluency, generate, new_tokens, unrelated,
                 unrelated_count, heldout, json_out, plot_out, batch_size, device, backend, server, base_server):
    """Score a model on CounterFact or zsRE before and after its patches (metrics: README "Evaluation")."""
    ctx = click.get_current_context()
    unused = [f"--{p.replace('_', '-')}" for p in ("new_tokens", "unrelated", "unrelated_count", "heldout")
              if ctx.get_parameter_source(p) is ParameterSource.COMMANDLINE]
    if unused and not generate:
        verb = "applies" if len(unused) == 1 else "apply"
        raise click.UsageError(f"{', '.join(unused)} only {verb} to the generated metrics: add --generate, or drop "
                               f"{'it' if len(unused) == 1 else 'them'}")
    from .report import format_table, plot, write_json
    from .run import evaluate

    # checked before the evaluation, not after it
    check_report_outputs({"--json": json_out, "--plot": plot_out}, (data, *patches, unrelated, heldout))

    result = evaluate(model, data, patches, n=n, fmt=fmt, zsre_target=zsre_target, fluency=fluency,
                      batch_size=batch_size, device=device, progress=sys.stderr.isatty(),
                      backend=backend, server=server, base_server=base_server, generate=generate,
                      new_tokens=new_tokens, unrelated=unrelated, unrelated_count=unrelated_count,
                      heldout=heldout)
    if plot_out:
        plot(result, plot_out)
    if json_out == "-":
        click.echo(json.dumps(result, indent=2))
        return
    if json_out:
        write_json(result, json_out)
    click.echo(format_table(result))
