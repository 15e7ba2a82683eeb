"""`memit-vllm stats`: covariance statistics as files (compute, sharded or under torchrun; merge; import
the reference's), for `make-patch --stats` (README "Large jobs"). Flag names are a user contract."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.files import check_out_file
from ..options import SEED, progress_shown
from .hparams import FORWARD_DTYPES, PRODUCT_DTYPES, parse_layers


def _model_layers(model: str, layers: str | None):
    """(checkpoint, its dims, the layers to read): by default the layers make-patch edits on this model."""
    from ..checkpoint import Checkpoint
    from .arch import check_layers, checkpoint_dims
    from .hparams import default_hparams

    ckpt = Checkpoint(model)
    dims = checkpoint_dims(ckpt)
    chosen = parse_layers(layers) or default_hparams(*dims)[0].layers
    check_layers(chosen, dims[1], ckpt.config)  # the same layer rules as make-patch (e.g. Gemma 4's shared KV)
    return ckpt, dims, chosen


def _cache(cache_dir: str | None) -> Path:
    from ..cache import cache_dir as default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def _report(stats, path: Path, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"stats": str(path), "layers": stats.layers, "tokens": stats.counts[stats.layers[0]],
                               "shards": {"of": stats.of, "parts": stats.parts}, "complete": stats.complete,
                               **stats.identity, "description": stats.description}, indent=1))
        return
    click.echo(f"wrote {path}: layers {stats.layers}, {stats.counts[stats.layers[0]]} tokens of "
               f"{stats.description}, {stats.shards_text()}")
    if not stats.complete:
        missing = sorted(set(range(stats.of)) - set(stats.parts))
        click.echo(f"make-patch needs every shard: merge shards {','.join(map(str, missing))} of {stats.of} into it")


@click.group("stats")
def stats_group() -> None:
    """Covariance statistics as files: compute (in shards, or under torchrun), merge, import."""


@stats_group.command("compute")
@click.option("--model", required=True, help="HF checkpoint dir, HF hub id, or default model name.")
@click.option("--corpus", help="A .txt/.jsonl file, self:N, or an HF dataset name (as make-patch --stats-corpus).")
@click.option("--layers", help="Layers, e.g. 4,5,6 or 4-8 (default: the layers make-patch edits on this model).")
@click.option("--tokens", type=click.IntRange(min=1), help="Token budget of the whole pass (default: the corpus).")
@click.option("--dtype", type=click.Choice(PRODUCT_DTYPES), default="float32", show_default=True,
              help="Precision of the k k^T products (sums are float64).")
@click.option("--model-dtype", type=click.Choice(FORWARD_DTYPES),
              help="dtype the model runs in (default: the checkpoint's own; bfloat16 is ~2x faster on AVX-512 BF16 "
                   "CPUs); recorded, and make-patch takes the file only when its statistics run the model in the "
                   "same (its --stats-model-dtype, else its --dtype).")
@click.option("--shard", default="0/1", show_default=True,
              help="i/N: this job computes part i of N of the pass (merge the N files with stats merge).")
@click.option("--out", required=True, type=click.Path(), help="Stats file to write.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of a self:N corpus.")
@click.option("--device", help="torch device (default: cuda when available).")
@click.option("--cache-dir", type=click.Path(), help="Cache dir (weights hashes; default $MEMIT_VLLM_CACHE).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def stats_compute(model, corpus, layers, tokens, dtype, model_dtype, shard, out, seed, device, cache_dir, as_json):
    """One pass over a corpus (or one shard of it): the per-layer sums of k k^T, as a stats file."""
    import torch

    from ..checkpoint import weights_sha256
    from . import distributed
    from .arch import load_editable, model_dtype as resolved_dtype
    from .devicemap import resolve_device
    from .covariance import Shard, corpus_spec, corpus_sums, resolve_corpus, stats_identity
    from .stats_file import StatsFile

    distributed.init_from_env()
    check_out_file(out, "--out")
    part = Shard.parse(shard)
    corpus_spec(corpus, "--corpus")
    device = resolve_device(device)
    ckpt, _, chosen = _model_layers(model, layers)
    forward = resolved_dtype(ckpt, model_dtype)
    model_sha = weights_sha256(ckpt, _cache(cache_dir))
    tok, em = load_editable(ckpt, forward)
    em.model.to(device)
    with torch.device(device):
        source = resolve_corpus(corpus, em, tok, seed, "--corpus")
        sums, count = corpus_sums(em, tok, chosen, source, tokens, dtype, part,
                                  progress=progress_shown(as_json) and distributed.is_main())
    if not distributed.is_main():
        return
    identity = stats_identity(model_sha, source.identity, tokens, dtype, em.d_ff, em.model.dtype)
    stats = StatsFile(identity, dict.fromkeys(chosen, count), part.count, [part.index], source.description, sums=sums)
    _report(stats, stats.save(out), as_json)


@stats_group.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Stats file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def stats_merge(files, out, as_json):
    """Add shards of one pass (same model, corpus, budget, dtype, layers; each shard once)."""
    from .stats_file import merge_stats, read_stats

    check_out_file(out, "--out")
    stats = merge_stats([read_stats(f) for f in files])
    _report(stats, stats.save(out), as_json)


@stats_group.command("import")
@click.option("--model", required=True, help="The checkpoint the statistics are of (shapes are checked).")
@click.option("--from", "source", required=True, type=click.Path(file_okay=False),
              help="The reference's stats dir, or its {model}/{ds}_stats dir (searched for the layers' .npz).")
@click.option("--layers", help="Layers to import (default: the layers make-patch edits on this model).")
@click.option("--precision", type=click.Choice(["float32", "float64"]), help="Pick files of this precision.")
@click.option("--samples", type=click.IntRange(min=1), help="Pick files of this sample size (e.g. 100000).")
@click.option("--out", required=True, type=click.Path(), help="Stats file to write.")
@click.option("--cache-dir", type=click.Path(), help="Cache dir (weights hashes; default $MEMIT_VLLM_CACHE).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def stats_import(model, source, layers, precision, samples, out, cache_dir, as_json):
    """Read ROME/MEMIT `layer_stats` .npz files (mom2.mom2, mom2.count) as a stats file of this checkpoint."""
    from ..checkpoint import weights_sha256
    from ..core.architectures import by_config
    from .stats_import import import_reference

    check_out_file(out, "--out")
    ckpt, (_, _, d_ff), chosen = _model_layers(model, layers)
    stats = import_reference(Path(source), by_config(ckpt.config), chosen, d_ff,
                             weights_sha256(ckpt, _cache(cache_dir)), precision, samples)
    _report(stats, stats.save(out), as_json)
