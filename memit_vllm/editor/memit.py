"""MEMIT end to end (paper eqs. 14-16): targets z at the last edited layer, then one closed-form
update per layer (`solve_layer_update`), each re-measuring keys and residuals on the model with earlier
updates applied:

    Delta_l = R_l K_l^T (lambda C_l + K_l K_l^T)^-1,   R_l = (z - h^L) / (layers left)

`edit` runs the steps in order (statistics, targets, layer updates); each returns its results, and the
report and the patch are built from them.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cache import cache_dir as default_cache_dir
from ..checkpoint import Checkpoint, weights_sha256
from ..core.records import EditRequest, load_requests, parse_record, read_subjects, validate_requests
from ..core.tokens import BUCKET_OVERHEAD_TOKENS, length_batches, pad_id, pad_right, target_ids
from ..errors import MemitError
from ..patch import BaseModel, Patch
from ..patch.tools import stack_patches
from .arch import EditableModel, check_layers, checkpoint_dims, load_editable, model_dtype
from . import distributed
from .devicemap import check_placement, describe, resolve_device
from .covariance import Corpus, corpus_spec, layer_covariances, layer_projections, resolve_corpus, stats_identity
from .hparams import (HParams, default_hparams, default_neighbours_per_edit, load_hparams_file,
                      neighbours_default_text)
from .lineage import changed_facts, lineage_facts, load_stack, merge_stack
from .lineage_keys import LineageKeys
from .memory import peak_memory, reset_gpu_peaks
from .precision import computing_in, forward_dtype, runs_natively
from .preserve import (NO_NEIGHBOURS, Preserved, PreservedKeys, PreservePrompt, generated_names,
                       generated_subjects, neighbour_pool, neighbour_prompts, preserved_keys,
                       read_preserve_file)
from .prompts import context_templates, encode
from .refine import NeighbourDraws, refine
from .sensitivity import output_fisher
from .solve import solve_alphaedit_update, solve_layer_update
from .stats_file import StatsFile, stats_for_edit
from .target_store import TargetStore, check_resume_dir, z_identity
from .targets import TargetResult, compute_targets, scaled_to_reach
from .trace import UpwardReads

KEY_BATCH_PROMPTS = 256  # prompts per forward when reading keys (memory/speed only)


@dataclass
class EditConfig:
    """Everything `edit` takes besides the model and the requests (`make_patch(**kwargs)` builds one)."""

    hparams: HParams | dict | str | Path | None = None  # HParams, a dict of overrides, or a JSON/YAML file
    # Single hyperparameters over `hparams` (None: keep its value): layers, lambda, mom2_n_tokens, mom2_dtype.
    layers: list[int] | None = None
    mom2_update_weight: float | None = None
    method: str | None = None  # "memit" or "alphaedit" (hparams.METHODS)
    z_dtype: str | None = None  # the z forward's dtype (hparams.FORWARD_DTYPES); None: the hparams' (the model's)
    dtype: str | None = None  # the model's dtype in the editor (hparams.FORWARD_DTYPES); None: the checkpoint's own
    stats_corpus: str | None = None  # a .txt/.jsonl file, self:N or an HF dataset name
    stats_tokens: int | None = None
    stats_dtype: str | None = None
    stats_model_dtype: str | None = None  # the covariance pass's model dtype (hparams mom2_model_dtype)
    stats: str | Path | None = None  # a stats file (stats_file.py) instead of a corpus pass
    cache_dir: str | Path | None = None  # default: memit_vllm.cache.cache_dir()
    seed: int = 0
    name: str = ""
    version: str = ""
    zsre_target: str = "answers"
    device: str | None = None  # default: cuda when available
    # A model larger than one GPU or than RAM: auto|balanced|balanced_low_0|sequential, or module -> device
    # (a dict, JSON or a JSON file; devicemap.py), and where "disk" entries wait (offload.py).
    device_map: str | dict | Path | None = None
    offload_folder: str | Path | None = None
    progress: bool = True
    on: list = field(default_factory=list)  # patches (files or Patch) to edit on, in stack order (lineage.py)
    preserve: str | Path | None = None  # JSON/JSONL prompts whose outputs the update must leave alone
    # Subject names (a file, vocab:N made-up names or model:N names the model lists): each edit's prompt
    # asked of `neighbours_per_edit` of them joins the preserved prompts. None: the hparams' (default none);
    # NO_NEIGHBOURS: none, whatever the hparams say. neighbours_per_edit None: fewer the larger the batch
    # (hparams.default_neighbours_per_edit).
    neighbour_subjects: str | Path | None = None
    neighbours_per_edit: int | None = None
    # Finished z batches are kept here, and read back when a run with the same settings resumes (target_store.py).
    resume_dir: str | Path | None = None
    # More requests than this are made as a lineage of chunks of this many, each on the model the ones before
    # left (their facts preserved, as --on), stacked into one patch (_edit_in_chunks). None: one batch. Given
    # (as with --on), a preset's on-stack variant applies.
    chunk: int | None = None
    # Speed only: results depend on these only as float rounding follows a batch's shape.
    key_batch_prompts: int = KEY_BATCH_PROMPTS
    # the cost of one more padded batch, in tokens: z steps and key reads group prompts by length (core.tokens)
    bucket_overhead_tokens: float = BUCKET_OVERHEAD_TOKENS

    @classmethod
    def of(cls, config: EditConfig | None = None, **kwargs) -> EditConfig:
        """`config` (default: the defaults) with the fields `kwargs` names replaced."""
        if config is not None and not isinstance(config, EditConfig):
            raise MemitError(f"config must be an EditConfig, not {type(config).__name__}; pass options by keyword")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise MemitError(f"unknown edit option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return replace(config or cls(), **kwargs)


@dataclass
class EditReport:
    """What a run did and cost: for --json and benchmarks (not stored in the patch: not reproducible)."""

    n_edits: int
    layers: list[int]
    hparams_source: str
    seconds: dict = field(default_factory=dict)  # stats / z / update / total
    z_target_prob: float = 0.0  # mean P(target) reached by the z optimisation
    z_steps: float = 0.0
    z_resumed: int = 0  # edits whose z came back from --resume-dir instead of being optimised
    delivered: dict = field(default_factory=dict)  # layer -> fraction of the residual the update delivered
    covariance: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    device: str = "cpu"
    method: str = "memit"
    made_on: list[str] = field(default_factory=list)  # ids of the stack the patch was made on
    changed: list[str] = field(default_factory=list)  # facts of the lineage this patch changes
    preserved_keys: int = 0  # key vectors per layer the update was solved to leave alone
    neighbours_per_edit: int = 0  # neighbour subjects each edit's prompt was asked of (0: no --neighbour-subjects)
    own_prompt_keys: int = 0  # of preserved_keys: the edits' own prompts' (hparams own_prompt_weight)
    lineage_keys_read: int = 0  # patches of the stack whose facts' keys were read (not in the cache)
    memory: dict = field(default_factory=dict)  # peak RSS, checkpoint size, peak per GPU (editor/memory.py)
    refine: dict = field(default_factory=dict)  # hparams refine_steps: the losses of its first and last step


@dataclass
class EditResult:
    patch: Patch
    report: EditReport


@dataclass
class Statistics:
    identity: dict[str, str]  # covariance.stats_identity
    description: str
    covs: dict[int, torch.Tensor]  # layer -> C_l (float64)
    info: dict[int, dict]  # layer -> tokens, cached (and seconds, when computed)
    projections: dict[int, torch.Tensor] = field(default_factory=dict)  # alphaedit: layer -> P (float64)
    provenance: dict = field(default_factory=dict)  # imported statistics: where they came from


@dataclass
class LayerUpdates:
    deltas: dict[str, torch.Tensor]  # checkpoint name -> delta (fp32, CPU, checkpoint layout)
    delivered: dict[int, float]  # layer -> fraction of the residual its update delivered on the edited keys
    keys: dict[int, torch.Tensor]  # layer -> the edit keys it read ([n, d_ff]; kept only when asked)


def _as_requests(requests, zsre_target: str) -> list[EditRequest]:
    if isinstance(requests, (str, Path)):
        return load_requests(requests, zsre_target=zsre_target)
    out = [r if isinstance(r, EditRequest) else parse_record(r, f"request {i}", zsre_target)
           for i, r in enumerate(requests)]
    return validate_requests(out)


def _hparams(dims: tuple[str, int, int], config: EditConfig, has_corpus: bool, n_edits: int
             ) -> tuple[HParams, str]:
    """The preset (its on-stack variant with --on or --chunk, else its lambda for a batch of `n_edits`), the
    user's hparams over it, the flags over those. A preset's half-precision z runs in the model's dtype where
    the editing device would emulate it (precision.runs_natively). Without a corpus (--stats FILE) a preset's
    steepest_fisher z, which reads F over the corpus, steps as "steepest" (the same descent in the plain
    metric), and a preset's corpus pull is left out, as it is with a method other than memit (no lambda C
    term to pull on); the preset's refinement is left out where it cannot run (no corpus, --device-map,
    torchrun); the source says so. A user's own choice of any of these is kept (and warned of or refused later,
    with the fix); a user's own lambda leaves the batch's factor out of the source too."""
    overrides = {"layers": config.layers, "mom2_update_weight": config.mom2_update_weight, "method": config.method,
                 "z_dtype": config.z_dtype, "mom2_n_tokens": config.stats_tokens, "mom2_dtype": config.stats_dtype,
                 "mom2_model_dtype": config.stats_model_dtype}
    hparams = config.hparams
    if isinstance(hparams, HParams):
        return _over(hparams, "given", overrides)
    values = {}
    if hparams is not None:
        values = hparams if isinstance(hparams, dict) else load_hparams_file(hparams)
    own_lambda = config.mom2_update_weight is not None or "mom2_update_weight" in values
    hp, source = default_hparams(*dims, on_stack=bool(config.on) or config.chunk is not None, n_edits=n_edits,
                                 own_lambda=own_lambda)
    hp, source = native_z(hp, source, _device_type(config))
    if not has_corpus and hp.v_optimizer == "steepest_fisher":
        hp, source = hp.replace(v_optimizer="steepest"), f"{source}, steepest z (no corpus to read F over)"
    if hparams is not None:
        hp, source = hp.replace(**values), f"{hparams if not isinstance(hparams, dict) else 'dict'} over {source}"
    hp = hp.replace(**overrides)
    if "corpus_restore_tokens" not in values and hp.corpus_restore_tokens and (not has_corpus or hp.method != "memit"):
        why = f"method {hp.method}" if has_corpus else "no corpus to read"
        hp, source = hp.replace(corpus_restore_tokens=0), f"{source}, no corpus pull ({why})"
    if "refine_steps" not in values and hp.refine_steps:
        why = "no corpus to read" if not has_corpus else "--device-map" if config.device_map is not None else \
            "torchrun" if distributed.active() else None
        if why:
            hp, source = hp.replace(refine_steps=0), f"{source}, not refined ({why})"
    return _over(hp, source, overrides)


def _over(hp: HParams, source: str, flags: dict) -> tuple[HParams, str]:
    """`hp` with the flags given (not None) over it, and the source saying which."""
    given = sorted(k for k, v in flags.items() if v is not None)
    return hp.replace(**flags), source + (f", with {', '.join(given)} given" if given else "")


def native_z(hp: HParams, source: str, device_type: str) -> tuple[HParams, str]:
    """A preset's half-precision z in the model's dtype where `device_type` would emulate it, said in the source."""
    if runs_natively(hp.z_dtype, device_type):
        return hp, source
    why = f"{hp.z_dtype} is emulated on this {device_type}"
    return replace(hp, z_dtype=None), f"{source}, z in the model's dtype ({why})"


def _device(config: EditConfig) -> torch.device:
    """Where the edit computes without a device map: the --device, else cuda when there is one."""
    return resolve_device(config.device)


def _device_type(config: EditConfig) -> str:
    """Where the edit computes: a device map's GPUs (when there are any), else _device."""
    if config.device_map is not None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return _device(config).type


@torch.no_grad()
def _already_predicted(em: EditableModel, tok, requests: list[EditRequest],
                      batch_prompts: int = KEY_BATCH_PROMPTS) -> list[int]:
    """Indices of requests whose new target is already the greedy continuation (a warning, not an error).

    A forward of every request on the whole model, so at 10,000 edits a cost of its own: prompts run
    shortest first (batches padded to similar lengths) and the output head reads only the target
    positions, not every position's vocabulary-wide logits."""
    seqs, targets = [], []
    for r in requests:
        enc, tgt = encode(tok, "{}", r), target_ids(tok, r.target_new)
        seqs.append(enc.ids + tgt[:-1])  # the last target token is predicted, never read
        targets.append(tgt)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    hits = []
    for start in range(0, len(order), batch_prompts):
        batch = order[start : start + batch_prompts]
        ids, mask = pad_right([seqs[i] for i in batch], pad_id(tok))
        hidden = em.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        at = [(j, len(seqs[i]) - len(targets[i]) + t) for j, i in enumerate(batch) for t in range(len(targets[i]))]
        rows, cols = zip(*at)
        predicted = em.logits(hidden[list(rows), list(cols)].to(em.output_device)).argmax(-1).tolist()
        k = 0
        for i in batch:
            if predicted[k : k + len(targets[i])] == targets[i]:
                hits.append(i)
            k += len(targets[i])
    return sorted(hits)


class KeyReader:
    """Keys and outputs of every (request, template) prompt, read once per layer of the update loop.

    Never recomputes what cannot change: the hidden states at the input of the layer just read are
    kept, and since updating that layer changes nothing below it, the next (higher) layer's read starts
    there instead of at the embeddings. Prompts are batched template by template, so only the bare
    prompts' batches run on up to the output layer (the others stop at the key layer), and within a
    template by length (`length_batches`: less padding). The kept states cost n x templates x tokens x
    d_model floats: ~0.35 GB per 1,000 SmolLM2 edits."""

    def __init__(self, em: EditableModel, tok, requests: list[EditRequest], groups: list[list[str]],
                 batch_prompts: int = KEY_BATCH_PROMPTS, overhead_tokens: float = BUCKET_OVERHEAD_TOKENS):
        self.n, self.groups = len(requests), groups
        batches, self.lookups, self.bare = [], [], []  # per batch: (ids, mask), subject positions, bare prompt?
        rows = []  # per batch: the requests it reads
        for t, template in enumerate(t for g in groups for t in g):
            encs = [encode(tok, template, r) for r in requests]
            for part in length_batches(torch.tensor([len(e.ids) for e in encs]), batch_prompts, overhead_tokens):
                batches.append(pad_right([encs[i].ids for i in part], pad_id(tok)))
                self.lookups.append(torch.tensor([encs[i].lookup for i in part]))
                self.bare.append(t == 0)
                rows.append(part)
        read = torch.cat(rows).view(-1, self.n) if rows else torch.zeros(0, 0, dtype=torch.long)
        # where template t's row of request i is in the reads' order (the bare template is t = 0)
        self.back = (read.argsort(1) + self.n * torch.arange(len(read))[:, None]).flatten()
        self.reads = UpwardReads(em, batches)

    @torch.no_grad()
    def read(self, layer: int, out_layer: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys at `layer` (averaged within, then across template groups) and layer `out_layer`'s output
        at the subject's last token of the bare prompt (None: not read), for every request: [n, d_ff],
        [n, d_model]. Only weights at or above the previously read layer may have changed since that read."""
        keys, outs = [], []
        wanted = [[out_layer] if bare and out_layer is not None else [] for bare in self.bare]
        for b, got in self.reads.read(layer, wanted):
            keys.append(_at_lookup(got.keys[layer], self.lookups[b]).float())  # averaged in fp32 whatever the dtype
            if wanted[b]:
                outs.append(_at_lookup(got.outputs[out_layer], self.lookups[b]).float())
        k = torch.cat(keys)[self.back].view(-1, self.n, keys[0].shape[-1])  # [templates, n, d_ff]
        bounds = torch.tensor([len(g) for g in self.groups]).cumsum(0).tolist()
        k_avg = torch.stack([k[a:b].mean(0) for a, b in zip([0, *bounds], bounds)]).mean(0)
        return k_avg, torch.cat(outs)[self.back[:self.n]] if outs else None


def _at_lookup(states: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Row i's state at position lookup[i], on the states' device (a layer's, under a device map)."""
    return states[torch.arange(len(lookup), device=states.device), lookup.to(states.device)]


def statistics(em: EditableModel, tok, ckpt: Checkpoint, hp: HParams, config: EditConfig,
               cache: Path, given: StatsFile | None = None) -> Statistics:
    """C_l for every edited layer (from the stats file `given`, else computed or cached), and AlphaEdit's
    projections when that is the method (cached). The statistics are of the base checkpoint's weights,
    also when editing on a stack."""
    if given is not None:
        covs, info = given.covariances(hp.layers)
        stats = Statistics(given.identity, given.description, covs, info, provenance=given.provenance)
    else:
        corpus = resolve_corpus(config.stats_corpus, em, tok, config.seed)
        model_sha = weights_sha256(ckpt, cache)
        forward = forward_dtype(hp.mom2_model_dtype, em.model)
        identity = stats_identity(model_sha, corpus.identity, hp.mom2_n_tokens, hp.mom2_dtype, em.d_ff, forward)
        with computing_in(em.model, forward):
            covs, info = layer_covariances(em, tok, hp.layers, corpus, identity, hp.mom2_n_tokens, hp.mom2_dtype,
                                           cache, config.progress)
        stats = Statistics(identity, corpus.description, covs, info)
    few = {l: info[l]["tokens"] for l in hp.layers if info[l]["tokens"] < em.d_ff}
    if few:
        warnings.warn(f"the covariance of layers {sorted(few)} is from {min(few.values())} tokens, fewer than "
                      f"d_ff = {em.d_ff}: it is singular and the update ill-posed; give the statistics many times "
                      "d_ff tokens (a larger corpus, self:N or --stats-tokens)", stacklevel=2)
    if hp.method == "alphaedit":
        stats.projections = layer_projections(covs, hp.nullspace_threshold, hp.layers, cache, stats.identity)
    return stats


def _stats_file(config: EditConfig, ckpt: Checkpoint, hp: HParams, d_ff: int, cache: Path) -> StatsFile | None:
    """The --stats file, checked against the checkpoint and the layers before the model loads."""
    if config.stats is None:
        return None
    given = [flag for flag, v in (("--stats-corpus", config.stats_corpus), ("--stats-tokens", config.stats_tokens),
                                  ("--stats-dtype", config.stats_dtype)) if v is not None]
    if given:
        raise MemitError(f"--stats FILE holds the statistics: drop {', '.join(given)} (they say how to compute them)")
    return stats_for_edit(config.stats, weights_sha256(ckpt, cache), hp.layers, d_ff,
                          hp.mom2_model_dtype or model_dtype(ckpt, config.dtype))


def layer_updates(em: EditableModel, reader: KeyReader, hp: HParams, targets: TargetResult, stats: Statistics,
                  preserved: PreservedKeys | None = None, progress: bool = True, keep_keys: bool = False
                  ) -> LayerUpdates:
    """One update per layer, applied to the model in turn; residuals (and preserved keys) re-measured on
    the model as updated so far. `keep_keys`: return the edit keys read (those of the edited model: each
    layer's are read after every layer below it is updated)."""
    deltas, delivered, keys = {}, {}, {}
    z_layer = hp.layers[-1]
    reading = forward_dtype(hp.keys_dtype, em.model)
    for i, layer in enumerate(tqdm(hp.layers, desc="layer updates", disable=not progress)):
        with computing_in(em.model, reading):  # a cast copy for the reads; the update goes to the originals
            k, h = reader.read(layer, z_layer)
            kept = preserved.at(layer, 1 / (len(hp.layers) - i)) if preserved else Preserved(None)
        device = em.device_of(layer)  # the solve beside its layer
        K = k.T.double().to(device)  # [d_ff, n]
        R = (targets.z.to(device) - h.to(device)).T.double() / (len(hp.layers) - i)
        R = em.to_output_space(layer, z_layer, K, R)  # [d_model, n]
        if hp.method == "alphaedit":
            update = solve_alphaedit_update(K, R, stats.projections[layer], kept.gram, hp.L2, kept.pull)
        else:  # [d_model, d_ff]
            update = solve_layer_update(K, R, stats.covs[layer], hp.mom2_update_weight, kept.gram, kept.pull)
        delivered[layer] = float((update @ K).norm() / R.norm().clamp(min=1e-12))
        if keep_keys:
            keys[layer] = k.cpu()
        update = update.float()
        em.add_to_weight(layer, update)
        deltas[em.param_name(layer)] = em.to_checkpoint_layout(update).contiguous().cpu()
    return LayerUpdates(deltas, delivered, keys)


def delivered_updates(em: EditableModel, reader: KeyReader, hp: HParams, targets: TargetResult, stats: Statistics,
                      preserved: PreservedKeys | None = None, progress: bool = True, keep_keys: bool = False,
                      before: dict[int, torch.Tensor] | None = None) -> tuple[LayerUpdates, TargetResult]:
    """layer_updates, and the targets it was made for. With hp.v_delivery_target, a first update measures
    how much of each delta reaches the last edited layer at the edit's prompt; the edited layers go back
    to their weights before it, and the update kept is made with each delta scaled to reach the target
    (targets.scaled_to_reach). The readers start again from the bottom (trace.UpwardReads), and restored
    texts' anchors are those the first update's first read found (restore.AnchoredTexts). `before`: the
    edited layers' weights as they are now, when the caller keeps a copy already (not copied again)."""
    if not hp.v_delivery_target:
        return layer_updates(em, reader, hp, targets, stats, preserved, progress, keep_keys), targets
    before = before or {layer: em.weight(layer).clone() for layer in hp.layers}
    layer_updates(em, reader, hp, targets, stats, preserved, progress)
    with computing_in(em.model, forward_dtype(hp.keys_dtype, em.model)):
        _, reached = reader.read(hp.layers[-1], hp.layers[-1])
    for layer, weight in before.items():
        em.set_weight(layer, weight)
    targets = scaled_to_reach(targets, reached, hp)
    return layer_updates(em, reader, hp, targets, stats, preserved, progress, keep_keys), targets


def refined_updates(em: EditableModel, tok, hp: HParams, requests: list[EditRequest], before: dict[int, torch.Tensor],
                    updates: LayerUpdates, prompts: list[PreservePrompt], neighbours: NeighbourDraws | None,
                    corpus: Corpus | None, config: EditConfig, groups: list[list[str]]) -> tuple[LayerUpdates, dict]:
    """`updates` refined together (editor/refine.py) from the weights `before` them, merged in their place,
    preserving `prompts` (--preserve's) and `neighbours`; the edit keys kept for the lineage re-read on the
    model as refined (a layer's keys depend only on the layers below it, as layer_updates reads them)."""
    for layer, weight in before.items():
        em.set_weight(layer, weight)
    # to_checkpoint_layout is its own inverse: the checkpoint-layout deltas as [d_model, d_ff]
    solved = {layer: em.to_checkpoint_layout(updates.deltas[em.param_name(layer)]) for layer in hp.layers}
    deltas, report = refine(em, tok, hp, requests, solved, [p.prompt for p in prompts], neighbours, corpus,
                            config.seed, config.progress)
    for layer, delta in deltas.items():
        em.add_to_weight(layer, delta)
    keys = _all_keys(em, tok, groups, hp, config.key_batch_prompts, config.bucket_overhead_tokens, requests) \
        if updates.keys else {}
    return LayerUpdates({em.param_name(l): em.to_checkpoint_layout(d).contiguous().cpu() for l, d in deltas.items()},
                        updates.delivered, {l: k.cpu() for l, k in keys.items()}), report


def _key_reader(em: EditableModel, tok, groups: list[list[str]], batch_prompts: int,
                requests: list[EditRequest], overhead_tokens: float) -> distributed.SplitReader:
    """The edit keys' reader (this rank's share of `requests`; reads return every request's rows)."""
    return distributed.SplitReader(lambda part: KeyReader(em, tok, part, groups, batch_prompts, overhead_tokens),
                                   requests)


def _all_keys(em: EditableModel, tok, groups: list[list[str]], hp: HParams, batch_prompts: int,
              overhead_tokens: float, requests: list[EditRequest]) -> dict[int, torch.Tensor]:
    """The keys of `requests` at every edited layer of the model as it is, read as layer_updates reads them."""
    reader = _key_reader(em, tok, groups, batch_prompts, requests, overhead_tokens)
    with computing_in(em.model, forward_dtype(hp.keys_dtype, em.model)):
        return {layer: reader.read(layer, None)[0] for layer in hp.layers}


@contextmanager
def _timed(seconds: dict, step: str):
    t = time.monotonic()
    yield
    seconds[step] = time.monotonic() - t


def edit(model: str | Path, requests, config: EditConfig | None = None, **kwargs) -> EditResult:
    """Compute a MEMIT patch for `requests` on the checkpoint `model`; see make_patch."""
    config = EditConfig.of(config, **kwargs)
    config = replace(config, progress=config.progress and distributed.is_main())
    t0 = time.monotonic()
    reset_gpu_peaks()
    requests = _as_requests(requests, config.zsre_target)
    if config.chunk is not None:
        if isinstance(config.chunk, bool) or not isinstance(config.chunk, int) or config.chunk < 1:
            raise MemitError(f"chunk must be an integer >= 1 (edits per chunk), not {config.chunk!r}")
        if len(requests) > config.chunk:
            return _edit_in_chunks(model, requests, config)
    ckpt = Checkpoint(model)
    dims = checkpoint_dims(ckpt)  # unsupported architectures and bad settings fail before loading
    hp, hp_source = _hparams(dims, config, has_corpus=config.stats is None, n_edits=len(requests))
    check_layers(hp.layers, dims[1], ckpt.config)
    placement = check_placement(config.device_map, config.offload_folder, config.device, ckpt)
    dtype = model_dtype(ckpt, config.dtype)
    distributed.check_shares(len(requests), "edits")
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    given = _stats_file(config, ckpt, hp, dims[2], cache)
    if config.stats_corpus is not None:
        corpus_spec(config.stats_corpus)
    if given is not None and hp.reads_corpus:
        raise MemitError("z_fisher_weight, v_optimizer steepest_fisher, corpus_restore_tokens and refine_steps (with "
                         "refine_corpus_weight) read the statistics corpus, and --stats FILE brings none: drop them "
                         "(or set refine_corpus_weight to 0), or let make-patch compute the statistics "
                         "(--stats-corpus)")
    if hp.refine_steps and placement is not None:
        raise MemitError("refine_steps is not yet measured under --device-map: set refine_steps to 0, or edit on one "
                         "device")
    if hp.refine_steps and distributed.active():
        raise MemitError("refine_steps runs in one process, not under torchrun: set refine_steps to 0, or run "
                         "make-patch as one process")
    if hp.corpus_restore_tokens and hp.method != "memit":
        raise MemitError(f"corpus_restore_tokens pulls on MEMIT's lambda C term, which method {hp.method} has not: "
                         "set it to 0, or use method memit")
    resume_dir = check_resume_dir(config.resume_dir) if config.resume_dir is not None else None
    if given is not None:  # the patch records the budget and dtype the statistics were computed with
        hp = replace(hp, mom2_n_tokens=given.budget, mom2_dtype=given.identity["dtype"])
        hp_source += f", statistics from {Path(config.stats).name}"
    stack = load_stack(config.on, ckpt)
    lineage = lineage_facts(stack)
    edited = {r.fact for r in requests}
    kept_facts = [f for f in lineage if f.fact not in edited]  # changed facts must move
    prompts = read_preserve_file(config.preserve) if config.preserve else []
    # --neighbour-subjects over the hparams' (a recipe file may name them); "none" turns them off
    spec = config.neighbour_subjects or hp.neighbour_subjects
    spec = None if spec == NO_NEIGHBOURS else str(spec) if spec else None
    hp = replace(hp, neighbour_subjects=spec)  # recorded in the patch
    generated = generated_subjects(spec)  # vocab:N or model:N, checked here, made below
    per_edit = None  # recorded: how many neighbours each edit's prompt is asked of
    if spec:
        per_edit = default_neighbours_per_edit(len(requests)) if config.neighbours_per_edit is None else \
            config.neighbours_per_edit
        if isinstance(per_edit, bool) or not isinstance(per_edit, int) or per_edit < 1:
            raise MemitError(f"neighbours_per_edit must be an integer >= 1 (or None: {neighbours_default_text()}), "
                             f"not {per_edit!r}")
    # the neighbour subjects, read once: the solve's rows are sampled from them, the refinement's drawn afresh
    pool_of = partial(neighbour_pool, requests, source=f"--neighbour-subjects {spec}",
                      edited={f.subject for f in lineage})
    pool = pool_of(read_subjects(spec, "--neighbour-subjects")) if spec and generated is None else []

    torch.manual_seed(config.seed)
    tok, em = load_editable(ckpt, dtype, **(placement.load_kwargs() if placement else {}))
    if not hp.preserve_lineage:
        kept_facts = []
    lineage_read = 0
    # Sampled on the CPU whatever the device, so the same seed gives the same templates everywhere (a
    # dispatched model computes on its devices, and returns the logits to the CPU inputs' device).
    groups = context_templates(em.model, tok, hp.context_template_seeds, hp.context_template_length, config.seed)
    if placement:  # the layers stay where the map put them; what is not a layer's works beside the head
        device, where = em.output_device, describe(em.model)
    else:
        device = _device(config)
        em.model.to(device)
        where = str(device)
    # New tensors on the editing device; on the CPU that is the default already, and the device mode would
    # route every torch call of the z loop through a Python handler (measurably slower, same results).
    default_device = nullcontext() if device.type == "cpu" else torch.device(device)
    # Every warning of the run goes into the report too (the CLI prints the report's).
    with default_device, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for what, name in (("the model's dtype (--dtype)", str(em.model.dtype).removeprefix("torch.")),
                           ("z_dtype (--z-dtype)", hp.z_dtype), ("keys_dtype", hp.keys_dtype),
                           ("mom2_model_dtype (--stats-model-dtype)", hp.mom2_model_dtype)):
            if not runs_natively(name, device.type):
                warnings.warn(f"{what} {name} is emulated on this {device.type}, which has no hardware for it (on an "
                              f"AVX2 CPU 9-32x slower than float32): set {what} to float32", stacklevel=1)
        seconds = {}
        with _timed(seconds, "stats"):  # of the base weights (the cache key), before the stack is merged
            stats = statistics(em, tok, ckpt, hp, config, cache, given)
        if generated:  # of the base model (before the stack is merged): its tokenizer's words or its own lists
            with _timed(seconds, "neighbour_names"):
                pool = pool_of(generated_names(*generated, em.model, tok, config.seed, cache, stats.identity["model"],
                                               config.progress))
        neighbour_rows = neighbour_prompts(requests, pool, per_edit, config.seed) if pool else []
        recorded = None
        if stack:
            recorded = LineageKeys(cache, stats.identity["model"], {
                "templates": groups, "layers": hp.layers, "dtype": dtype,
                "keys_dtype": str(forward_dtype(hp.keys_dtype, em.model))}, hp.layers, em.d_ff)
        if recorded and kept_facts and hp.lineage_keys == "as_made":
            with _timed(seconds, "lineage_keys"):
                lineage_read = recorded.prepare(em, ckpt, stack, {f.fact for f in kept_facts}, partial(
                    _all_keys, em, tok, groups, hp, config.key_batch_prompts, config.bucket_overhead_tokens))
            kept_facts = []  # their keys are the cached ones
        text_corpus = resolve_corpus(config.stats_corpus, em, tok, config.seed) if hp.reads_corpus else None
        merge_stack(em, ckpt, stack)
        # after the stack is merged: what is restored is restored to the outputs of the model being edited
        preserved = preserved_keys(em, tok, hp, kept_facts, groups, prompts + neighbour_rows,
                                   config.key_batch_prompts, recorded, text_corpus, config.bucket_overhead_tokens,
                                   edits=requests)
        for i in _already_predicted(em, tok, requests, config.key_batch_prompts):
            warnings.warn(f"request {i}: {requests[i].text()!r} already continues with {requests[i].target_new!r}",
                          stacklevel=2)
        templates = [t for g in groups for t in g]
        fisher_corpus = text_corpus if hp.reads_fisher else None
        store = None if resume_dir is None else TargetStore(resume_dir, z_identity(
            stats.identity["model"], [p.patch_id for p in stack], dtype, hp, templates, hp.layers[-1], device,
            fisher_corpus.identity if fisher_corpus else None))
        with _timed(seconds, "z"):
            fisher = None if fisher_corpus is None else partial(
                output_fisher, em, tok, fisher_corpus, hp.layers, hp.z_fisher_tokens,
                forward_dtype(hp.z_dtype, em.model), config.seed)
            targets = distributed.split_edits(
                lambda part: compute_targets(em, tok, part, templates, hp.layers[-1], hp, config.progress,
                                             config.bucket_overhead_tokens, store, fisher), requests)
        with _timed(seconds, "update"):
            reader = _key_reader(em, tok, groups, config.key_batch_prompts, requests, config.bucket_overhead_tokens)
            before = {layer: em.weight(layer).clone() for layer in hp.layers} if hp.refine_steps else {}
            updates, targets = delivered_updates(em, reader, hp, targets, stats, preserved, config.progress,
                                                 bool(stack), before)
        refined = {}
        if hp.refine_steps:
            with _timed(seconds, "refine"):
                draws = NeighbourDraws(pool, len(neighbour_rows)) if pool else None
                updates, refined = refined_updates(em, tok, hp, requests, before, updates, prompts, draws,
                                                   text_corpus, config, groups)
    seconds["total"] = time.monotonic() - t0
    warned = [str(w.message) for w in caught]
    for message in warned:  # again, outside the recording block, for callers that watch warnings
        warnings.warn(message, stacklevel=2)
    report = EditReport(
        len(requests), hp.layers, hp_source, seconds=seconds,
        z_target_prob=float(targets.target_prob.mean()), z_steps=float(targets.steps.float().mean()),
        z_resumed=int(targets.resumed.sum()),
        delivered=updates.delivered, covariance=stats.info, warnings=warned, device=where, method=hp.method,
        made_on=[p.patch_id for p in stack], changed=changed_facts(requests, lineage),
        preserved_keys=preserved.count, neighbours_per_edit=per_edit or 0, own_prompt_keys=preserved.own.tokens,
        lineage_keys_read=lineage_read, refine=refined,
        memory=peak_memory(ckpt))

    patch = Patch(
        deltas=updates.deltas,
        base=BaseModel(str(model), ckpt.architecture, ckpt.config_sha256),
        base_weights={n: ckpt.fingerprint(n) for n in updates.deltas},
        requests=[r.to_dict() for r in requests],
        hparams={**hp.to_dict(), "seed": config.seed, "source": hp_source, "context_templates": groups,
                 "dtype": dtype, "neighbours_per_edit": per_edit},
        covariance={"corpus": stats.identity["corpus"], "description": stats.description,
                    "tokens": {str(l): stats.info[l]["tokens"] for l in hp.layers}, "dtype": hp.mom2_dtype,
                    **({"provenance": stats.provenance} if stats.provenance else {})},
        name=config.name, version=config.version, made_on=[p.patch_id for p in stack],
    )
    if recorded:  # the next patch on this lineage reads none of these keys again
        recorded.save([*patch.made_on, patch.patch_id], updates.keys)
    return EditResult(patch, report)


def _edit_in_chunks(model, requests: list[EditRequest], config: EditConfig) -> EditResult:
    """`requests` made chunk by chunk, each chunk `--on` the configured stack and the chunks before it (its
    update solved on the model they left, their facts' keys preserved), then stacked into one patch made on
    the configured stack. A solve over many edits at once spreads each edit's residual over keys that
    resemble many others; a lineage of smaller solves keeps other subjects and ordinary text better at the
    same edits (docs/benchmarks.md, "Session 19"). With --resume-dir a rerun reuses every finished chunk's z."""
    parts: list[EditResult] = []
    for start in range(0, len(requests), config.chunk):
        parts.append(edit(model, requests[start:start + config.chunk],  # one chunk each: no deeper split
                          replace(config, on=[*config.on, *(p.patch for p in parts)])))
    stacked = stack_patches([p.patch for p in parts], version=config.version)
    patch = replace(stacked, name=config.name, hparams={**stacked.hparams, "chunk": config.chunk})
    return EditResult(patch, _chunks_report([p.report for p in parts], len(requests)))


def _chunks_report(reports: list[EditReport], n_edits: int) -> EditReport:
    """One report of a chunked run: times and counts summed, z figures averaged over the edits, the largest
    GPU peaks (the process's peak RSS is the last chunk's already), the last chunk's update figures."""
    share = [r.n_edits / n_edits for r in reports]
    steps = dict.fromkeys(k for r in reports for k in r.seconds)
    gpu = {d: max(r.memory.get("gpu_peak_gb", {}).get(d, 0.0) for r in reports)
           for d in reports[-1].memory.get("gpu_peak_gb", {})}
    return replace(
        reports[-1], n_edits=n_edits, seconds={k: sum(r.seconds.get(k, 0.0) for r in reports) for k in steps},
        z_target_prob=sum(r.z_target_prob * w for r, w in zip(reports, share)),
        z_steps=sum(r.z_steps * w for r, w in zip(reports, share)), z_resumed=sum(r.z_resumed for r in reports),
        warnings=[w for r in reports for w in r.warnings], made_on=reports[0].made_on,
        changed=[c for r in reports for c in r.changed], lineage_keys_read=sum(r.lineage_keys_read for r in reports),
        memory=reports[-1].memory | ({"gpu_peak_gb": gpu} if gpu else {}))


def make_patch(model: str | Path, requests, config: EditConfig | None = None, **kwargs) -> Patch:
    """MEMIT patch for `requests` (a file path, EditRequests, or request dicts) on checkpoint `model`
    (a checkpoint dir, an HF hub id or a default model name).

    Options: an EditConfig, or its fields as keyword arguments: hparams (HParams, dict or JSON/YAML
    file), layers, mom2_update_weight, stats_corpus (file, self:N or HF dataset), stats_tokens,
    stats_dtype, stats_model_dtype, stats (a stats file instead: README "Large jobs"), dtype (the model's in the editor,
    default the checkpoint's), cache_dir, seed, name, version,
    zsre_target, device (default: cuda when available), device_map and offload_folder (a model larger
    than one GPU or than RAM, README "Models: architectures, dtype, size"), progress, method, on (patches
    to edit on, README "Editing over time"), preserve (a prompts file), neighbour_subjects (a subjects file,
    model:N, vocab:N or none; default the hparams') and neighbours_per_edit, resume_dir (finished z batches
    kept there; a rerun resumes, README "Large jobs"), chunk (more requests than this are made as a lineage
    of chunks stacked into one patch), and the speed knobs key_batch_prompts and bucket_overhead_tokens.
    """
    return edit(model, requests, config, **kwargs).patch
