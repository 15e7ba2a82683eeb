"""MEMIT end to end (paper eqs. 14-16): targets z at the last edited layer, then one closed-form
update per layer, each re-measuring keys and residuals on the model with earlier updates applied.

    Delta_l = R_l K_l^T (lambda C_l + K_l K_l^T)^-1,   R_l = (z - h^L) / (layers left)

solved in float64 with `torch.linalg.solve` (never an explicit inverse).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cache import cache_dir as default_cache_dir
from ..checkpoint import Checkpoint, weights_sha256
from ..errors import MemitError
from ..patch import BaseModel, Patch
from .arch import EditableModel, arch_spec
from .covariance import Corpus, layer_covariances, resolve_corpus
from .hparams import HParams, default_hparams, load_hparams_file
from .prompts import context_templates, encode, pad_id, pad_right, target_ids
from .requests import EditRequest, load_requests, parse_record, validate_requests
from .targets import compute_targets
from .trace import capture

KEY_BATCH_PROMPTS = 256


@dataclass
class EditReport:
    """What a run did and cost: for --json and benchmarks (not stored in the patch: not reproducible)."""

    n_edits: int
    layers: list[int]
    hparams_source: str
    seconds: dict = field(default_factory=dict)  # stats / z / update / total
    z_target_prob: float = 0.0  # mean P(target) reached by the z optimisation
    z_steps: float = 0.0
    delivered: dict = field(default_factory=dict)  # layer -> fraction of the residual the update delivered
    covariance: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    device: str = "cpu"


@dataclass
class EditResult:
    patch: Patch
    report: EditReport


def _as_requests(requests, zsre_target: str) -> list[EditRequest]:
    if isinstance(requests, (str, Path)):
        return load_requests(requests, zsre_target=zsre_target)
    out = [r if isinstance(r, EditRequest) else parse_record(r, f"request {i}", zsre_target)
           for i, r in enumerate(requests)]
    return validate_requests(out)


def _hparams(em: EditableModel, hparams, overrides: dict) -> tuple[HParams, str]:
    hp, source = default_hparams(em.model.config.model_type, em.n_layers, em.d_ff)
    if isinstance(hparams, HParams):
        hp, source = hparams, "given"
    elif hparams is not None:
        values = hparams if isinstance(hparams, dict) else load_hparams_file(hparams)
        hp, source = hp.replace(**values), f"{hparams if not isinstance(hparams, dict) else 'dict'} over {source}"
    given = sorted(k for k, v in overrides.items() if v is not None)
    return hp.replace(**overrides), source + (f", with {', '.join(given)} given" if given else "")


@torch.no_grad()
def _already_predicted(em: EditableModel, tok, requests: list[EditRequest]) -> list[int]:
    """Indices of requests whose new target is already the greedy continuation."""
    seqs, spans = [], []
    for r in requests:
        enc, tgt = encode(tok, "{}", r), target_ids(tok, r.target_new)
        seqs.append(enc.ids + tgt)
        spans.append((len(enc.ids), tgt))
    hits = []
    for start in range(0, len(seqs), KEY_BATCH_PROMPTS):
        ids, mask = pad_right(seqs[start : start + KEY_BATCH_PROMPTS], pad_id(tok))
        logits = em.model(input_ids=ids, attention_mask=mask).logits
        for j in range(ids.shape[0]):
            n, tgt = spans[start + j]
            if logits[j, n - 1 : n - 1 + len(tgt)].argmax(-1).tolist() == tgt:
                hits.append(start + j)
    return hits


class KeyReader:
    """Keys and outputs of every (request, template) prompt, read once per layer of the update loop.

    Never recomputes what cannot change: the hidden states at the input of the layer just read are
    kept, and since updating that layer changes nothing below it, the next (higher) layer's read starts
    there instead of at the embeddings. Prompts are batched template by template, so only the bare
    prompts' batches run on up to the output layer (the others stop at the key layer). The kept states
    cost n x templates x tokens x d_model floats: ~0.35 GB per 1,000 SmolLM2 edits."""

    def __init__(self, em: EditableModel, tok, requests: list[EditRequest], groups: list[list[str]]):
        self.em, self.n, self.groups = em, len(requests), groups
        self.batches = []  # (ids, mask, lookup, bare)
        for t, template in enumerate(t for g in groups for t in g):
            encs = [encode(tok, template, r) for r in requests]
            for start in range(0, len(encs), KEY_BATCH_PROMPTS):
                part = encs[start : start + KEY_BATCH_PROMPTS]
                ids, mask = pad_right([e.ids for e in part], pad_id(tok))
                self.batches.append((ids, mask, torch.tensor([e.lookup for e in part]), t == 0))
        self.saved: tuple[int, list[torch.Tensor], int] | None = None  # (layer, inputs per batch, tuple_len)

    @torch.no_grad()
    def read(self, layer: int, out_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys at `layer` (averaged within, then across template groups) and layer `out_layer`'s output
        at the subject's last token of the bare prompt, for every request: [n, d_ff], [n, d_model].
        Only weights at or above the previously read layer may have changed since that read."""
        saved = self.saved if self.saved and self.saved[0] <= layer else None
        keys, outs, inputs = [], [], []
        for b, (ids, mask, lookup, bare) in enumerate(self.batches):
            got = capture(self.em, ids, mask, outputs=[out_layer] if bare else [], keys=[layer], inputs=[layer],
                          resume=(saved[0], saved[1][b], saved[2]) if saved else None)
            at = torch.arange(len(lookup)), lookup
            keys.append(got.keys[layer][at])
            if bare:
                outs.append(got.outputs[out_layer][at])
            inputs.append(got.inputs[layer])
        self.saved = (layer, inputs, got.tuple_len.get(layer - 1, 0))  # how layer-1 returns: resume_after mimics it
        k = torch.cat(keys).view(-1, self.n, keys[0].shape[-1])  # [templates, n, d_ff]
        bounds = torch.tensor([len(g) for g in self.groups]).cumsum(0).tolist()
        k_avg = torch.stack([k[a:b].mean(0) for a, b in zip([0, *bounds], bounds)]).mean(0)
        return k_avg, torch.cat(outs)


def edit(model: str | Path, requests, *, hparams=None, layers: list[int] | None = None,
         mom2_update_weight: float | None = None,
         stats_corpus: str | None = None, stats_tokens: int | None = None, stats_dtype: str | None = None,
         cache_dir: str | Path | None = None, seed: int = 0, name: str = "", version: str = "",
         zsre_target: str = "answers", device: str | None = None, progress: bool = True) -> EditResult:
    """Compute a MEMIT patch for `requests` on the checkpoint `model`; see make_patch."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.monotonic()
    requests = _as_requests(requests, zsre_target)
    ckpt = Checkpoint(model)
    arch_spec(ckpt.config.get("model_type", "?"))  # unsupported architectures fail before loading
    cache = Path(cache_dir) if cache_dir else default_cache_dir()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(ckpt.path)
    if tok.pad_token is None:  # batched sampling pads; many Llama tokenizers define no pad token
        tok.pad_token = tok.eos_token
    hf = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    em = EditableModel(hf, ckpt.keys())
    hp, hp_source = _hparams(em, hparams, {"layers": layers, "mom2_update_weight": mom2_update_weight,
                                           "mom2_n_tokens": stats_tokens, "mom2_dtype": stats_dtype})
    em.check_layers(hp.layers)
    report = EditReport(len(requests), hp.layers, hp_source, device=str(device))
    # Sampled on the CPU whatever the device, so the same seed gives the same templates everywhere.
    groups = context_templates(hf, tok, hp.context_template_seeds, hp.context_template_length, seed)
    hf.to(device)
    with torch.device(device):  # every tensor the editor creates lives beside the model
        deltas, corpus = _run(em, tok, ckpt, requests, hp, groups, cache, stats_corpus, seed, report, progress)
    report.seconds["total"] = time.monotonic() - t0

    patch = Patch(
        deltas=deltas,
        base=BaseModel(str(model), ckpt.architecture, ckpt.config_sha256),
        base_weights={n: ckpt.fingerprint(n) for n in deltas},
        requests=[r.to_dict() for r in requests],
        hparams={**hp.to_dict(), "seed": seed, "source": hp_source, "context_templates": groups},
        covariance={"corpus": corpus.identity, "description": corpus.description,
               "tokens": {str(l): report.covariance[l]["tokens"] for l in hp.layers}, "dtype": hp.mom2_dtype},
        name=name, version=version,
    )
    return EditResult(patch, report)


def _run(em: EditableModel, tok, ckpt: Checkpoint, requests: list[EditRequest], hp: HParams, groups, cache: Path,
         stats_corpus: str | None, seed: int, report: EditReport, progress: bool) -> tuple[dict, Corpus]:
    """Statistics, targets and the layer updates: the deltas (CPU, checkpoint layout) and the corpus."""
    for i in _already_predicted(em, tok, requests):
        msg = f"request {i}: {requests[i].text()!r} already continues with {requests[i].target_new!r}"
        report.warnings.append(msg)
        warnings.warn(msg, stacklevel=2)

    # Covariance statistics (cached).
    t = time.monotonic()
    corpus = resolve_corpus(stats_corpus, em, tok, seed)
    model_sha = weights_sha256(ckpt, cache)
    covs, report.covariance = layer_covariances(em, tok, hp.layers, corpus, model_sha, hp.mom2_n_tokens,
                                                hp.mom2_dtype, cache, progress)
    report.seconds["stats"] = time.monotonic() - t

    # Targets z at the last edited layer.
    t = time.monotonic()
    z_layer = hp.layers[-1]
    targets = compute_targets(em, tok, requests, [t for g in groups for t in g], z_layer, hp, progress)
    report.z_target_prob = float(targets.target_prob.mean())
    report.z_steps = float(targets.steps.float().mean())
    report.seconds["z"] = time.monotonic() - t

    # One update per layer, residuals re-measured on the model as updated so far.
    t = time.monotonic()
    deltas = {}
    reader = KeyReader(em, tok, requests, groups)
    for i, layer in enumerate(tqdm(hp.layers, desc="layer updates", disable=not progress)):
        k, h = reader.read(layer, z_layer)
        K = k.T.double()  # [d_ff, n]
        R = (targets.z - h).T.double() / (len(hp.layers) - i)  # [d_model, n]
        A = hp.mom2_update_weight * covs[layer].to(K.device) + K @ K.T
        update = R @ torch.linalg.solve(A, K).T  # [d_model, d_ff]
        report.delivered[layer] = float((update @ K).norm() / R.norm().clamp(min=1e-12))
        update = update.float()
        em.add_to_weight(layer, update)
        deltas[em.param_name(layer)] = em.to_checkpoint_layout(update).contiguous().cpu()
    report.seconds["update"] = time.monotonic() - t
    return deltas, corpus


def make_patch(model: str | Path, requests, **kwargs) -> Patch:
    """MEMIT patch for `requests` (a file path, EditRequests, or request dicts) on checkpoint `model`.

    Keyword arguments: hparams (HParams, dict or JSON/YAML file), layers, mom2_update_weight, stats_corpus (file, self:N or
    HF dataset), stats_tokens, stats_dtype, cache_dir, seed, name, version, zsre_target, device (default: cuda
    when available), progress.
    """
    return edit(model, requests, **kwargs).patch
