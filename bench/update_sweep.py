"""Choose the update rule and its settings by both views of quality (teacher-forced and generated),
without recomputing what cannot change.

The z vectors depend on the requests, the z settings and the LAST edited layer only: not on lambda, the
method, its settings, the preserved keys or the lower layers. So they are computed once per run (and
kept in --out: a rerun resumes), and each configuration re-runs only the layer updates (seconds) and
the evaluation (`memit-vllm eval --generate`'s definitions: ES/PS/NS teacher forced; rewrite and
paraphrase completions that start with the new target; neighbour and unrelated completions kept from
the unedited model, first word and all tokens; KL on the held-out slice, which the statistics here
exclude). One JSON per configuration in --out (a rerun skips those it finds), the unedited model's scores
and completions in --out's before-*.json (computed once), and a Markdown table: give each z setting
(--z-hparams, --train-paraphrases) its own --out.

    .venv/bin/python bench/update_sweep.py --edits 100 --out /work/benchout/sweep \\
        --configs '[{"name": "preset"}, {"name": "lambda x4", "mom2_update_weight": 3072},
                    {"name": "alphaedit", "method": "alphaedit", "L2": 10}]'

A configuration is a name plus hyperparameter overrides (docs/hyperparameters.md), and optionally
"preserve_records": [start, stop]: the rewrite prompts (with their true answers) of those records of the
data file (or of "preserve_data": another file) become --preserve prompts: other subjects asked with the
same relation templates as the edits, kept disjoint from the evaluated and the unrelated records; or
"preserve_file": a ready --preserve file; or "neighbours": {"data": FILE, "records": [start, stop],
"per_edit": N}: make-patch --neighbour-subjects with the subjects of those records (never a scored one),
or {"vocabulary": COUNT, "per_edit": N}: COUNT made-up names from the tokenizer (vocabulary_subjects), or
{"model": COUNT, "per_edit": N}: COUNT names the model lists (model_subjects, cached as make-patch does).
A configuration with none of these takes the hparams' neighbour_subjects (the SmolLM2 preset's model:2000),
as many per edit as make-patch takes (hparams.default_neighbours_per_edit). Every configuration starts from
make-patch's settings for one batch of --edits (the preset's lambda for that size: hparams.batch_lambda_factor).

Update rules the editor does not offer (measured here before any becomes an option; `variant_solver`):
"layer_lambda": [one lambda multiplier per edited layer]; "layer_share": [one multiplier per edited layer of
the residual share the layer is asked to deliver]; "fisher_metric": P, the memory term measured in the
layer's output Fisher F_l^P (solve_metric_update; F_l over the first 8,192 corpus tokens, kept in --out);
"hold_mean": W, the mean of the batch's edit keys held like a preserved key of weight W per edit (every key
receives 1-2% of every residual, docs/hyperparameters.md "Session 7": is it their common part?);
"residual_mean": c, that share of the mean residual taken off every residual before the layer's solve.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import cache, partial
from pathlib import Path

import torch

from memit_vllm.cache import cache_dir
from memit_vllm.checkpoint import Checkpoint
from memit_vllm.core.records import load_requests, read_dataset, read_subjects, template_prompt
from memit_vllm.editor import EditConfig, HParams, default_hparams, load_editable, memit
from memit_vllm.editor.hparams import default_neighbours_per_edit
from memit_vllm.editor.arch import checkpoint_dims
from memit_vllm.editor.covariance import file_corpus
from memit_vllm.editor.memit import (KEY_BATCH_PROMPTS, KeyReader, delivered_updates, native_z, refined_updates,
                                    statistics)
from memit_vllm.editor.preserve import (NO_NEIGHBOURS, PreservePrompt, preserved_keys, generated_names,
                                        generated_subjects, neighbour_pool, neighbour_prompts, read_preserve_file)
from memit_vllm.editor.precision import forward_dtype
from memit_vllm.editor.prompts import context_templates
from memit_vllm.editor.refine import NeighbourDraws
from memit_vllm.editor.sensitivity import output_fisher
from memit_vllm.editor.solve import solve_layer_update
from memit_vllm.editor.target_store import TargetStore, z_identity
from memit_vllm.editor.targets import TargetResult, compute_targets
from memit_vllm.evaluate.generation import Generated, covariance_budget, generation_task, unrelated_prompts
from memit_vllm.evaluate.metrics import Completion
from memit_vllm.evaluate.patching import swapped
from memit_vllm.evaluate.run import measure_counterfact
from memit_vllm.evaluate.scoring import TransformersScorer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPUS = DATA / "corpus" / "smollm2_self_2k.jsonl"
# update rules of variant_solver
VARIANTS = ("layer_lambda", "layer_share", "fisher_metric", "hold_mean", "residual_mean")
SHOWN = ["ES", "PS", "NS", "rewrite_hit", "paraphrase_hit", "neighbour_word_kept", "unrelated_word_kept",
         "unrelated_word_kept_confident", "unrelated_kept", "heldout_kl"]


def targets_for(out: Path, model_sha: str, em, tok, requests, templates, hp: HParams, seed: int):
    """z for the requests, kept in `out`/z by make-patch --resume-dir's store (keyed by what z depends on:
    `model_sha` is the weights' hash, as statistics identities hold it), and whether every batch was read
    back from there."""
    corpus = file_corpus(CORPUS) if hp.reads_fisher else None  # its first tokens: never the held-out slice
    identity = z_identity(model_sha, [], str(em.model.dtype).removeprefix("torch."), hp, templates, hp.layers[-1],
                          em.output_device, corpus.identity if corpus else None)
    fisher = None if corpus is None else partial(output_fisher, em, tok, corpus, hp.layers, hp.z_fisher_tokens,
                                                 forward_dtype(hp.z_dtype, em.model), seed)
    result = compute_targets(em, tok, requests, templates, hp.layers[-1], hp, progress=True,
                             store=TargetStore(out / "z", identity), fisher=fisher)
    return result, bool(result.resumed.all())


@cache
def layer_fisher(out: Path, em, tok, seed: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F_l of one layer (sensitivity.output_fisher over the first 8,192 corpus tokens; kept in `out`) as its
    eigendecomposition (f, U), float64: read and decomposed once per run."""
    path = out / f"fisher-layer{layer}.pt"
    if not path.is_file():
        torch.save(output_fisher(em, tok, file_corpus(CORPUS), [layer], 8192, torch.float32, seed), path)
    return torch.linalg.eigh(torch.load(path).double())


def layer_leak(fisher: tuple[torch.Tensor, torch.Tensor], cov: torch.Tensor, delta: torch.Tensor) -> dict:
    """The update D's leak on corpus keys (covariance C) seen through the output Fisher F = U diag(f) U^T:
    its energy tr(D C D^T), its second-order KL 1/2 tr(F D C D^T), and the leak's mean F-eigenvalue over F's
    mean (1: as loud as a random direction; F's extremes given in the same unit)."""
    f, U = fisher
    F, D = (U * f) @ U.T, delta.double().to(cov.device)
    leak = D @ cov.double() @ D.T
    energy = float(torch.trace(leak))
    kl2 = float(0.5 * (F * leak).sum())
    return {"leak": energy, "kl2": kl2, "rayleigh": 2 * kl2 / energy / float(f.mean()),
            "f_min": float(f[0] / f.mean()), "f_max": float(f[-1] / f.mean())}


def z_summary(out: Path, em, tok, targets, hp: HParams, seed: int) -> dict:
    """What the z deltas are like: mean |delta| / |h|, the share at the clamp, their mean loudness on
    ordinary text d^T F d / 2 (F of sensitivity.output_fisher over the first z_fisher_tokens corpus tokens at
    the edited layers, kept in `out`: the expected KL were a delta added at a random position), and the share
    of sum |delta_i|^2 along the deltas' mean (the part every edit shares: "residual_mean")."""
    path = out / "fisher.pt"
    if path.is_file():
        fisher = torch.load(path)
    else:
        fisher = output_fisher(em, tok, file_corpus(CORPUS), hp.layers, hp.z_fisher_tokens, torch.float32, seed)
        torch.save(fisher, path)
    h = (targets.z - targets.delta).norm(dim=1)
    ratio = targets.delta.norm(dim=1) / h
    d = targets.delta.double()
    at_clamp = (ratio > 0.99 * hp.clamp_norm_factor).float()
    mean = d.mean(0)
    return {"delta_over_h": float(ratio.mean()), "at_clamp": float(at_clamp.mean()),
            "loudness": float(0.5 * ((d @ fisher.double()) * d).sum(1).mean()),
            "mean_share": float((d @ (mean / mean.norm())).pow(2).sum() / d.pow(2).sum())}


def solve_metric_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, mom2_update_weight: float,
                        metric: torch.Tensor, preserved: torch.Tensor | None = None,
                        pull: torch.Tensor | None = None) -> torch.Tensor:
    """solve_layer_update with the memory term measured in an output metric M (symmetric positive definite;
    the identity gives MEMIT's update), in float64:

        min ||D K - R||^2 + tr(M D (lambda C + K_p K_p^T) D^T) - 2 tr(D^T R_p K_p^T)

    With M the layer's output Fisher on ordinary text (mean eigenvalue 1) the corpus keys' penalty is the
    KL their changed outputs cause, to second order, rather than their Euclidean size. The stationarity
    condition D K K^T + M D P = B (P = lambda C + K_p K_p^T, B = R K^T + R_p K_p^T) decouples in M's
    eigenbasis (M = U diag(f) U^T) once P = L L^T and L^-1 K K^T L^-T = V diag(m) V^T: row j of U^T D is
    (U^T B Q)_j diag(1 / (m + f_j)) Q^T with Q = L^-T V."""
    K, R = keys.double(), residuals.double()
    P = cov.to(K.device, torch.float64) * mom2_update_weight
    if preserved is not None:
        P = P + preserved.to(K.device, torch.float64)
    B = R @ K.T if pull is None else R @ K.T + pull.to(K.device, torch.float64)
    f, U = torch.linalg.eigh(metric.to(K.device, torch.float64))
    L = torch.linalg.cholesky(P)
    LK = torch.linalg.solve_triangular(L, K, upper=False)  # L^-1 K K^T L^-T = LK LK^T
    m, V = torch.linalg.eigh(LK @ LK.T)
    Q = torch.linalg.solve_triangular(L.T, V, upper=True)
    return U @ (((U.T @ B @ Q) / (m[None, :] + f[:, None])) @ Q.T)


@contextmanager
def variant_solver(cfg: dict, layers: list[int], covs: dict[int, torch.Tensor], fishers):
    """The editor's layer solve replaced, for one configuration, by the rule its "layer_lambda",
    "layer_share", "fisher_metric", "hold_mean" or "residual_mean" asks for (the layer is found by its
    covariance: layer_updates passes stats.covs[layer]). `fishers(layer)`: F_l's eigendecomposition (layer_fisher)."""
    if not any(k in cfg for k in VARIANTS):
        yield
        return
    layer_of = {id(c): layer for layer, c in covs.items()}
    lam, share = cfg.get("layer_lambda", [1.0] * len(layers)), cfg.get("layer_share", [1.0] * len(layers))
    if len(lam) != len(layers) or len(share) != len(layers):
        raise SystemExit(f"{cfg['name']}: layer_lambda and layer_share take one number per edited layer {layers}")

    def solve(K, R, cov, weight, preserved=None, pull=None):
        layer = layer_of[id(cov)]
        i = layers.index(layer)
        if "hold_mean" in cfg:  # the edit keys' mean held at hold_mean per edit (an edit key counts 1)
            mean = K.double().mean(1, keepdim=True)
            held = (cfg["hold_mean"] * K.shape[1]) * (mean @ mean.T)
            preserved = held if preserved is None else preserved.to(held.device, torch.float64) + held
        if "residual_mean" in cfg:  # that share of the residuals' common part left unwritten
            R = R - cfg["residual_mean"] * R.mean(1, keepdim=True)
        if "fisher_metric" not in cfg:
            return solve_layer_update(K, R * share[i], cov, weight * lam[i], preserved, pull)
        f, U = fishers(layer)
        f = f.clamp(min=0) ** cfg["fisher_metric"]
        return solve_metric_update(K, R * share[i], cov, weight * lam[i], (U * (f / f.mean())) @ U.T, preserved, pull)

    original = memit.solve_layer_update
    memit.solve_layer_update = solve
    try:
        yield
    finally:
        memit.solve_layer_update = original


def statistics_of(hp: HParams) -> tuple:
    """What a configuration's covariances depend on besides the corpus."""
    return hp.layers, hp.mom2_dtype, hp.mom2_model_dtype


def record_prompts(data: Path, span: list[int], exclude: set[str]) -> list[PreservePrompt]:
    """The rewrite prompts (with their true answers) of records [start, stop) of `data` whose subjects
    are not in `exclude`, as --preserve reads them."""
    _, records = read_dataset(data, span[1])
    return [PreservePrompt(r.rewrite_prompt, r.target_true if r.target_true.startswith(" ") else " " + r.target_true)
            for r in records[span[0]:] if r.subject not in exclude]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact_500.json"))
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--configs", required=True, help="JSON list of configurations (see the module docstring)")
    ap.add_argument("--out", required=True, help="directory for the cached z and one JSON per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-paraphrases", type=int, default=0, metavar="K",
                    help="each request carries its record's first K paraphrase prompts (make-patch's `paraphrases`), "
                         "and every run scores only the others (held out); 0: none trained, all scored")
    ap.add_argument("--score-paraphrases-from", type=int, default=0, metavar="K",
                    help="score only paraphrase prompts K.. (the held-out set of a --train-paraphrases K run, "
                         "for the baseline without training)")
    ap.add_argument("--z-from", type=int, default=0, metavar="K",
                    help="the z of the first --edits requests taken from the first K's (kept in --out): each edit's z "
                         "is optimised on its own (z_batch_edits changes only float rounding), so a larger run's "
                         "store serves a smaller one; not with --train-paraphrases")
    ap.add_argument("--layer-kl", action="store_true",
                    help="per edited layer, the update's second-order KL on corpus keys, 1/2 tr(F_l D C_l D^T), and "
                         "where its leak lies in F_l (layer_leak)")
    ap.add_argument("--unrelated-count", type=int, default=None, metavar="N",
                    help="score N unrelated prompts instead of eval's 100 (a share of 100 is known to about "
                         "+-10 points, of 1,000 to +-3); the before and result files then end in -uN")
    ap.add_argument("--z-hparams", default="{}", help='JSON overrides of the z settings for every configuration '
                    '(e.g. {"v_early_stop": "most_probable"}): one z computation per distinct value')
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = json.loads(args.configs)

    ckpt = Checkpoint(args.model)
    tok, em = load_editable(ckpt)
    base_hp, source = native_z(*default_hparams(*checkpoint_dims(ckpt), n_edits=args.edits), "cpu")
    base_hp = base_hp.replace(**json.loads(args.z_hparams))
    requests = load_requests(args.data, limit=args.edits)
    fmt, records = read_dataset(args.data, args.edits)  # full CounterFact or the shortened counterfact_edit_10k
    held_out = max(args.train_paraphrases, args.score_paraphrases_from)
    if args.train_paraphrases:
        requests = [replace(q, paraphrases=tuple(template_prompt(p, q.subject, "paraphrase")
                                                 for p in r.paraphrase_prompts[:args.train_paraphrases]))
                    for q, r in zip(requests, records)]
    records = [replace(r, paraphrase_prompts=r.paraphrase_prompts[held_out:]) for r in records]
    if not all(r.paraphrase_prompts for r in records):
        raise SystemExit(f"some records have no paraphrase prompt past the first {held_out}")
    torch.manual_seed(args.seed)
    groups = context_templates(em.model, tok, base_hp.context_template_seeds, base_hp.context_template_length,
                               args.seed)
    config = EditConfig(stats_corpus=str(CORPUS), stats_tokens=covariance_budget(tok, CORPUS), seed=args.seed)
    stats = statistics(em, tok, ckpt, base_hp.replace(mom2_n_tokens=config.stats_tokens), config, cache_dir())
    t = time.monotonic()
    if args.z_from and (args.z_from < args.edits or args.train_paraphrases):
        raise SystemExit("--z-from K takes K >= --edits, and not --train-paraphrases")
    z_requests = load_requests(args.data, limit=args.z_from) if args.z_from else requests
    targets, cached = targets_for(out, stats.identity["model"], em, tok, z_requests, [t for g in groups for t in g],
                                  base_hp, args.seed)
    if args.z_from:
        targets = TargetResult(*(getattr(targets, f)[:len(requests)] for f in TargetResult.__dataclass_fields__))
    print(f"z for {len(requests)} edits: {'cached' if cached else f'{time.monotonic() - t:.0f} s'}")
    z_info = z_summary(out, em, tok, targets, base_hp, args.seed)
    print("z: " + ", ".join(f"{k} {v:.3f}" for k, v in z_info.items()))

    unrelated, unrelated_source = unrelated_prompts(args.data, fmt, records, count=args.unrelated_count)
    suffix = f"-u{args.unrelated_count}" if args.unrelated_count else ""
    _, everything = read_dataset(args.data)  # the subjects scored here (edited or unrelated): never preserved
    asked = set(unrelated)
    scored = {r.subject for r in everything[:len(records)]} | {r.subject for r in everything[len(records):]
                                                                if r.rewrite_prompt in asked}
    task = generation_task(tok, fmt, records, unrelated, unrelated_source, CORPUS)
    scorer = TransformersScorer(em.model, tok, progress=False)
    before_file = out / f"before-{args.edits}-p{held_out}{suffix}.json"
    original = {em.arch.weight_name(l): em.down_proj(l).weight.detach().clone() for l in range(em.n_layers)}
    before = json.loads(before_file.read_text()) if before_file.is_file() else {}
    if "tf" not in before or "generated" not in before:  # the unedited scores and completions, once per --out
        generated_before = task.complete(scorer)
        before = {"tf": measure_counterfact(scorer, records),
                  "generated": {k: [[list(c.tokens), c.text, c.margin] for c in getattr(generated_before, k)]
                                for k in ("hits", "kept")}}
        before_file.write_text(json.dumps(before))
    generated_before = Generated(*([Completion(tuple(t), text, margin) for t, text, margin in before["generated"][k]]
                                   for k in ("hits", "kept")))

    rows = []
    for cfg in configs:
        name = cfg["name"]
        result_file = out / f"{name.replace(' ', '_').replace('/', '-')}-{args.edits}{suffix}.json"
        if result_file.is_file():
            rows.append(json.loads(result_file.read_text()))
            continue
        overrides = {k: v for k, v in cfg.items() if k not in ("name", "preserve_records", "preserve_data",
                                                               "preserve_file", "neighbours", *VARIANTS)}
        hp = base_hp.replace(**overrides)
        if hp.layers[-1] != base_hp.layers[-1]:
            raise SystemExit(f"{name}: the last layer must stay {base_hp.layers[-1]} (z is computed there)")
        if hp.method == "alphaedit" or statistics_of(hp) != statistics_of(base_hp):  # a projection, other C_l
            stats = statistics(em, tok, ckpt, hp.replace(mom2_n_tokens=config.stats_tokens), config, cache_dir())
        subjects = None  # the neighbour subjects' pool, which the refinement draws from afresh
        if "neighbours" in cfg:  # make-patch --neighbour-subjects, with the subjects of these records
            spec = cfg["neighbours"]
            # made-up names from the tokenizer, or names the model lists (preserve.generated_names)
            kind = ("vocab", spec["vocabulary"]) if spec.get("vocabulary") else \
                ("model", spec["model"]) if spec.get("model") else None
            if kind:
                subjects = generated_names(*kind, em.model, tok, args.seed, cache_dir(), stats.identity["model"])
            else:
                _, pool = read_dataset(spec.get("data", args.data), spec["records"][1])
                subjects = [r.subject for r in pool[spec["records"][0]:] if r.subject not in scored]
            prompts = neighbour_prompts(requests, subjects, spec["per_edit"], args.seed)
        elif "preserve_file" in cfg:
            prompts = read_preserve_file(cfg["preserve_file"])
        elif "preserve_records" in cfg:
            prompts = record_prompts(Path(cfg.get("preserve_data", args.data)), cfg["preserve_records"], scored)
        elif hp.neighbour_subjects not in (None, NO_NEIGHBOURS):  # the preset's (or configuration's), as make-patch
            kind = generated_subjects(hp.neighbour_subjects)
            subjects = read_subjects(hp.neighbour_subjects, "neighbour_subjects") if kind is None else \
                generated_names(*kind, em.model, tok, args.seed, cache_dir(), stats.identity["model"])
            prompts = neighbour_prompts(requests, subjects, default_neighbours_per_edit(len(requests)), args.seed)
        else:
            prompts = []
        start = time.monotonic()
        preserved = preserved_keys(em, tok, hp, [], groups, prompts, KEY_BATCH_PROMPTS,
                                   corpus=file_corpus(CORPUS), edits=requests)  # corpus: never the held-out slice
        with variant_solver(cfg, hp.layers, stats.covs, partial(layer_fisher, out, em, tok, args.seed)):
            updates, used = delivered_updates(em, KeyReader(em, tok, requests, groups), hp, targets, stats,
                                              preserved, progress=False)
        if hp.refine_steps:  # as make-patch: the solved deltas refined together (editor/refine.py)
            before_update = {l: original[em.arch.weight_name(l)] for l in hp.layers}
            draws = NeighbourDraws(neighbour_pool(requests, subjects), len(prompts)) if subjects else None
            updates, refined = refined_updates(em, tok, hp.replace(mom2_n_tokens=config.stats_tokens), requests,
                                               before_update, updates, [] if subjects else prompts, draws,
                                               file_corpus(CORPUS), config, groups)
            print(f"{name}: refined {refined}", flush=True)
        # per-edit scales (v_delivery_target: target / the share rho_i the first update delivered), 5/50/95%
        scales = used.delta.norm(dim=1) / targets.delta.norm(dim=1).clamp(min=1e-12)
        quantiles = [round(float(q), 3) for q in scales.quantile(torch.tensor([0.05, 0.5, 0.95]))]
        seconds = time.monotonic() - start
        after = measure_counterfact(scorer, records)
        generated = task.metrics(task.complete(scorer), generated_before)
        kl, _ = scorer.heldout_kl(task.heldout, lambda: swapped(em.model, original))
        generated |= {"heldout_kl": kl}
        if args.layer_kl:
            generated |= {"layers": {layer: layer_leak(layer_fisher(out, em, tok, args.seed, layer), stats.covs[layer],
                                                       em.to_checkpoint_layout(  # its own inverse: [d_model, d_ff]
                                                           em.weight(layer) - original[em.arch.weight_name(layer)]))
                                     for layer in hp.layers}}
        row = {"name": name, "overrides": overrides, **{k: cfg[k] for k in VARIANTS if k in cfg},
               "preserve_records": cfg.get("preserve_records"),
               "preserve_file": cfg.get("preserve_file"),
               "neighbours": cfg.get("neighbours"),
               "update_seconds": round(seconds, 1), "delivered": updates.delivered, "delivery_scales": quantiles,
               "z": z_info,
               **after, **generated, "before": before["tf"]}
        result_file.write_text(json.dumps(row, indent=1))
        rows.append(row)
        with torch.no_grad():  # back to the unedited weights for the next configuration
            for n, w in original.items():
                em.model.get_parameter(n).copy_(w)
        print(f"{name}: " + ", ".join(f"{k} {row[k]:.3f}" for k in SHOWN if k in row), flush=True)

    print(f"\n{len(requests)} CounterFact edits ({args.data}), {source}; unedited ES {before['tf']['ES']:.3f} "
          f"PS {before['tf']['PS']:.3f} NS {before['tf']['NS']:.3f}\n")
    print("| configuration | " + " | ".join(SHOWN) + " |")
    print("|---|" + "---|" * len(SHOWN))
    for row in rows:
        print(f"| {row['name']} | " + " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in SHOWN) + " |")


if __name__ == "__main__":
    main()
