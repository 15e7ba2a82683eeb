"""`memit-vllm make-patch`: requests + checkpoint -> patch file (flag names are a user contract)."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict

import click

from ..core.files import check_out_file
from ..options import SEED, progress_shown, zsre_target_option
from ..errors import MemitError
from .hparams import FORWARD_DTYPES, METHODS, PRODUCT_DTYPES, neighbours_default_text, parse_layers


@click.command("make-patch")
@click.option("--model", required=True,
              help="HF checkpoint dir, HF hub id, or default model name (memit-vllm model list) to edit.")
@click.option("--requests", "requests_path", type=click.Path(),
              help="Edit requests: CounterFact/EasyEdit/zsRE JSON, or our JSON/JSONL/CSV records.")
@click.option("--out", required=True, type=click.Path(), help="Patch file to write.")
@click.option("--hparams", help="Hyperparameters (reference key names): a JSON/YAML file, or the JSON mapping "
                                 "itself, e.g. '{\"mom2_update_weight\": 768}'.")
@click.option("--layers", help="Layers to edit, e.g. 4,5,6,7,8 or 4-8.")
@click.option("--lambda", "mom2_update_weight", type=float,
              help="mom2_update_weight (lambda). Default: the model's preset; SmolLM2's doubles it in one batch of up "
                   "to 100 edits, less in larger ones, not from 1,000 (docs/hyperparameters.md).")
@click.option("--stats-corpus", help="Covariance corpus: a .txt/.jsonl file, self:N, or an HF dataset name.")
@click.option("--stats-tokens", type=int, help="Token budget for the covariance (default: the whole corpus).")
@click.option("--stats-dtype", type=click.Choice(PRODUCT_DTYPES),
              help="dtype of the covariance's k k^T products (default float32; sums are float64; bfloat16: each "
                   "batch's products summed in fp32 and rounded once: faster on AVX-512 BF16 CPUs).")
@click.option("--stats-model-dtype", type=click.Choice(FORWARD_DTYPES),
              help="dtype the model runs in for the covariance pass (default: the model's; bfloat16 is ~2x faster on "
                   "CPUs with AVX-512 BF16; products and sums keep --stats-dtype/float64). Other statistics: cached "
                   "apart, and a --stats file must have been computed with the same stats compute --model-dtype.")
@click.option("--stats", "stats_file", type=click.Path(dir_okay=False),
              help="Covariance statistics from this file (memit-vllm stats compute/merge/import) instead of a pass.")
@click.option("--cache-dir", type=click.Path(), help="Cache dir (default $MEMIT_VLLM_CACHE or XDG cache).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--name", default="", help="Patch name label.")
@click.option("--version", "version_", default="", help="Patch version label.")
@click.option("--limit", type=int, help="Use only the first N requests of the file.")
@zsre_target_option
@click.option("--device", help="torch device, e.g. cuda or cpu (default: cuda when available). Patches made on a GPU "
              "differ from CPU ones by float rounding.")
@click.option("--device-map", metavar="MAP",
              help="Spread a model larger than one GPU, or than RAM, over GPUs, CPU RAM and disk (accelerate): auto, "
                   "balanced, sequential, or a JSON object or file of module -> device (\"cpu\", \"disk\", a GPU "
                   "index, \"cuda:N\"). Each layer's work runs where the layer does; disk entries are slow.")
@click.option("--offload-folder", type=click.Path(file_okay=False),
              help="Scratch directory for the weights a --device-map puts on \"disk\" (needed for disk entries).")
@click.option("--on", "on", multiple=True, type=click.Path(dir_okay=False),
              help="Edit on top of this patch (repeat, in stack order): the new patch is solved on base + these "
                   "and must be served after exactly them.")
@click.option("--withdraw", multiple=True, metavar="SUBJECT|CASE_ID",
              help="Restore the base model's answer for the facts of the --on patches with this subject or case "
                   "id (repeat for more).")
@click.option("--method", type=click.Choice(METHODS), help="Update rule (default: the hparams' method, memit).")
@click.option("--preserve", type=click.Path(dir_okay=False),
              help="JSON/JSONL prompts (optionally with the answer to keep) the update must leave alone.")
@click.option("--neighbour-subjects", metavar="FILE|model:N|vocab:N|none",
              help="Subject names (text, one per line, or a JSON list), model:N for N names the model lists "
                   "itself (well-known people, places, companies...; listed once per model and cached), or vocab:N "
                   "for N made-up names from the tokenizer's words: each edit's prompt asked of some of them joins "
                   "the preserved prompts, so other subjects keep their answers to the edited relations. Default: "
                   "the hparams' neighbour_subjects (SmolLM2's preset: model:2000; other models: none); none: off.")
@click.option("--neighbours-per-edit", type=click.IntRange(min=1), default=None,
              help=f"How many --neighbour-subjects each edit's prompt is asked of (a seeded sample). Default: "
                   f"{neighbours_default_text()}.")
@click.option("--z-dtype", type=click.Choice(FORWARD_DTYPES),
              help="dtype of the z optimisation's forward/backward (default: the model's; bfloat16 is ~2x faster on "
                   "CPUs with AVX-512 BF16 and on GPUs; the delta, its optimiser and the loss stay fp32).")
@click.option("--dtype", type=click.Choice(FORWARD_DTYPES),
              help="dtype the model is loaded in (default: the checkpoint's own; z, keys, covariance and solves keep "
                   "fp32/float64 where they need it).")
@click.option("--resume-dir", type=click.Path(), metavar="DIR",
              help="Keep each finished batch of z vectors in DIR; rerunning the same command after an interruption "
                   "reads them back and computes only the rest (other settings or requests compute afresh).")
@click.option("--chunk", type=click.IntRange(min=1), metavar="N",
              help="Make more than N requests as a lineage of chunks of N, each solved on the model the chunks "
                   "before left (their facts preserved, as --on does), stacked into one patch (README \"Large "
                   "jobs\"). Default: one batch.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of text.")
def make_patch_command(model, requests_path, out, hparams, layers, mom2_update_weight, stats_corpus, stats_tokens,
                       stats_dtype, stats_model_dtype, stats_file, cache_dir, seed, name, version_, limit, zsre_target,
                       device, device_map, offload_folder, on,
                       withdraw, method, z_dtype, dtype, preserve, neighbour_subjects, neighbours_per_edit, resume_dir,
                       chunk, as_json):
    """Compute MEMIT z vectors and layer deltas for the edit requests and write a patch file (under
    torchrun: the work split across the processes, rank 0 writes; README "Large jobs")."""
    from ..core.records import load_requests, validate_requests
    from ..patch import load_patch
    from . import distributed
    from .lineage import withdrawal_requests
    from .memit import EditConfig, edit

    distributed.init_from_env()
    check_out_file(out, "--out", (requests_path, *on, preserve, stats_file))
    if not requests_path and not withdraw:
        raise MemitError("give the facts to edit with --requests FILE (or --withdraw with --on)")
    requests = load_requests(requests_path, limit=limit, zsre_target=zsre_target) if requests_path else []
    if withdraw:  # the facts only (headers); edit() validates the stack against the model, once
        facts_of = [load_patch(p) for p in on]
        requests = validate_requests(requests + withdrawal_requests(facts_of, list(withdraw)), "--requests/--withdraw")
    config = EditConfig(hparams=hparams, layers=parse_layers(layers), mom2_update_weight=mom2_update_weight,
                        method=method, z_dtype=z_dtype, dtype=dtype, stats_corpus=stats_corpus,
                        stats_tokens=stats_tokens, stats_dtype=stats_dtype, stats_model_dtype=stats_model_dtype,
                        stats=stats_file, cache_dir=cache_dir, seed=seed, name=name, version=version_,
                        zsre_target=zsre_target, device=device, device_map=device_map, offload_folder=offload_folder,
                        progress=progress_shown(as_json), on=list(on), preserve=preserve,
                        neighbour_subjects=neighbour_subjects, neighbours_per_edit=neighbours_per_edit,
                        resume_dir=resume_dir, chunk=chunk)
    with warnings.catch_warnings(record=True):  # they are in the report, printed below
        warnings.simplefilter("always")
        result = edit(model, requests, config)
    if not distributed.is_main():
        return
    path = result.patch.save(out)
    report = {"patch": str(path), "patch_id": result.patch.patch_id, **asdict(result.report)}
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    r = result.report
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"{r.n_edits} edits on {r.device}, layers {r.layers}, {r.method} ({r.hparams_source})")
    if r.made_on:
        click.echo(f"made on {' -> '.join(r.made_on)} ({r.preserved_keys} preserved keys per layer; the lineage "
                   f"keys of {r.lineage_keys_read} of its patches read, the rest cached); serve it after exactly "
                   "those patches")
    if r.preserved_keys and not r.made_on:
        click.echo(f"{r.preserved_keys} preserved keys per layer (--preserve, --neighbour-subjects"
                   + (f": {r.neighbours_per_edit} per edit" if r.neighbours_per_edit else "")
                   + (f"; {r.own_prompt_keys} of the edits' own prompts)" if r.own_prompt_keys else ")"))
    for change in r.changed:
        click.echo(f"changes {change}")
    if r.z_resumed:
        click.echo(f"z: {r.z_resumed} of {r.n_edits} edits read back from --resume-dir {resume_dir}")
    click.echo(f"z: mean P(target) {r.z_target_prob:.3f} after {r.z_steps:.1f} steps; residual delivered per "
               f"layer: " + ", ".join(f"{l}: {v:.2f}" for l, v in r.delivered.items()))
    if r.refine:
        a, b = r.refine["first_step"], r.refine["last_step"]
        click.echo(f"refined over {r.refine['steps']} steps ({r.refine['prompts']} --preserve prompts, "
                   f"{r.refine['neighbour_rows']} neighbour rows over {r.refine['neighbour_subjects']} subjects, "
                   f"{r.refine['texts']} corpus texts): edit CE {a['edit_ce']:.3f} -> {b['edit_ce']:.3f}, KL "
                   f"neighbours {a['kl_neighbours']:.4f} -> {b['kl_neighbours']:.4f}, corpus {a['kl_corpus']:.4f} -> "
                   f"{b['kl_corpus']:.4f} (first and last step)")
    click.echo("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items()))
    click.echo(f"memory: peak RSS {r.memory['peak_rss_gb']:.2f} GB (weights on disk {r.memory['checkpoint_gb']:.2f} GB)"
               + "".join(f", {d} peak {gb:.2f} GB" for d, gb in r.memory.get("gpu_peak_gb", {}).items()))
    click.echo(f"wrote {path} ({result.patch.patch_id})")
