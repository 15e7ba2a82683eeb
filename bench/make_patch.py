"""What make-patch costs on the default model, and what it buys.

    .venv/bin/python bench/make_patch.py z-speed  [--edits 8] [--z-variants '[{}, {"z_dtype": "bfloat16"}]']
    .venv/bin/python bench/make_patch.py covariance [--tokens 50000]
    .venv/bin/python bench/make_patch.py spectrum [--thresholds 5e-3,1e-2,2e-2]
    .venv/bin/python bench/make_patch.py repeat   [--edits 16] [--hparams '{"z_dtype": "bfloat16"}']
    .venv/bin/python bench/make_patch.py refine-speed [--edits 100] [--steps 3] [--group-costs 64,inf]
    .venv/bin/python bench/make_patch.py scaling  [--sizes 10,100] [--data FILE] [--eval] [--bucket-overhead 64]
                                                  [--dtype|--saved-in bfloat16] [--layers 3-9] [--lambda 768]
                                                  [--hparams '{"v_num_grad_steps": 40}']

- z-speed: edits/s of the batched, prefix-cached z optimisation vs the plain one-edit-at-a-time,
  full-forward implementation of the same eq. 16 (memit_vllm.editor.reference, the one the exactness
  test checks against), same requests, templates and hyperparameters, same run.
- covariance: tokens/s of the one-pass statistics for all edited layers (the model in fp32, then in
  bf16: make-patch --stats-model-dtype, with fp32 and bf16 products: --stats-dtype) vs a bare full
  forward over the same tokens, and how far each pass's C_l are from the fp32 pass's.
- repeat: `memit-vllm make-patch` run twice in separate processes (same requests, seed and settings,
  this process's thread count, SOURCE_DATE_EPOCH set), and whether the two patch files are identical
  byte for byte (README "Reproducible"); if not, how far apart their deltas are. Exits 1 if they differ.
- refine-speed: seconds per step of the refinement (editor/refine.py) for each per-group cost of its length
  batches (inf: rows in drawn order, as before session 32), on the first --edits records, the subjects of
  the next 2,000 as the neighbour subjects (make-patch's neighbour rows per edit), the statistics corpus,
  and seeded random deltas at the preset's layers (a step's cost does not depend on their values).
- scaling: make-patch end to end for each size (time split stats / z / update, peak RSS) and, with
  --eval, CounterFact scores before/after. Stats are cached after the first size. The hyperparameter
  options override the preset (docs/hyperparameters.md's table is rows of this with --sizes 10).
Each prints the machine it ran on and a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from memit_vllm.default_models import prepare
from memit_vllm.core.tokens import BUCKET_OVERHEAD_TOKENS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPUS = DATA / "corpus" / "smollm2_self_2k.jsonl"
NEIGHBOUR_SUBJECTS = 2000  # refine-speed: a pool the size of SmolLM2's preset's (model:2000)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows: timings differ by CPU kind (bf16 above all)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    from memit_vllm.editor.precision import runs_natively

    gpu = f", GPU {torch.cuda.get_device_name()} (the editor's default device)" if torch.cuda.is_available() else ""
    bf16 = "native" if runs_natively("bfloat16", "cpu") else "emulated"
    return (f"{cpu_name()} (bf16 {bf16}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")


def load(model_dir):
    from memit_vllm.editor import load_editable

    tok, em = load_editable(model_dir)
    return tok, em.model, em


def z_speed(args, model_dir):
    from memit_vllm.editor import default_hparams, load_requests
    from memit_vllm.editor.prompts import context_templates
    from memit_vllm.editor.reference import plain_z_delta  # the plain eq. 16, one edit at a time
    from memit_vllm.editor.targets import compute_targets

    tok, model, em = load(model_dir)
    hp, _ = default_hparams(model.config.model_type, em.n_layers, em.d_ff)
    reqs = load_requests(DATA / "counterfact" / "counterfact_500.json", limit=args.edits)
    templates = [t for g in context_templates(model, tok, hp.context_template_seeds,
                                              hp.context_template_length, 0) for t in g]
    layer = hp.layers[-1]
    if args.group_costs:  # the batched path alone, once per per-group cost of targets.length_buckets
        print(f"machine: {machine()}; {len(reqs)} CounterFact edits, layer {layer}, batched z only")
        print("| group cost (row-tokens) | batched z (s) |\n|---|---|")
        for cost in map(float, args.group_costs.split(",")):
            t = time.perf_counter()
            compute_targets(em, tok, reqs, templates, layer, hp, progress=False, bucket_overhead_tokens=cost)
            print(f"| {cost:g} | {time.perf_counter() - t:.1f} |")
        return
    if args.z_variants:  # the batched path alone, once per set of z hyperparameters (e.g. z_dtype, v_lr)

        print(f"machine: {machine()}; {len(reqs)} CounterFact edits, layer {layer}, batched z only")
        print("| z hparams | batched z (s) | mean steps | at the step cap | mean / min P(target) | mean final loss "
              "| max rel. distance of z to the first |\n|---|---|---|---|---|---|---|")
        first = None
        for overrides in json.loads(args.z_variants):
            variant = hp.replace(**{"z_batch_edits": len(reqs), **overrides})
            t = time.perf_counter()
            got = compute_targets(em, tok, reqs, templates, layer, variant, progress=False)
            seconds = time.perf_counter() - t
            first = got.z if first is None else first
            dist = float(((got.z - first).norm(dim=1) / first.norm(dim=1)).max())
            capped = int((got.steps >= variant.v_num_grad_steps - 1).sum())
            prob = f"{got.target_prob.mean():.3f} / {got.target_prob.min():.3f}"
            print(f"| {json.dumps(overrides)} | {seconds:.1f} | {got.steps.float().mean():.1f} | "
                  f"{capped} of {len(reqs)} | {prob} | {got.final_loss.mean():.3f} | {dist:.1e} |", flush=True)
        return
    t = time.perf_counter()
    batched = compute_targets(em, tok, reqs, templates, layer, hp, progress=False)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    plain = [plain_z_delta(model, tok, em.layers, r, templates, layer, hp) for r in reqs]
    slow = time.perf_counter() - t
    err = max(float((b - p).norm() / p.norm()) for b, p in zip(batched.delta, plain))
    print(f"machine: {machine()}; {len(reqs)} CounterFact edits, layer {layer}, {hp.v_num_grad_steps} steps")
    print("| implementation | seconds | edits/s |\n|---|---|---|")
    print(f"| plain: one edit at a time, full forward | {slow:.1f} | {len(reqs) / slow:.3f} |")
    print(f"| batched, layers <= L skipped, prefix KV cached | {fast:.1f} | {len(reqs) / fast:.3f} |")
    print(f"speed-up {slow / fast:.1f}x; max relative difference of the deltas {err:.1e}")


def refine_speed(args, model_dir):
    from memit_vllm.core.records import parse_record, read_records
    from memit_vllm.editor import default_hparams, load_requests
    from memit_vllm.editor.covariance import file_corpus
    from memit_vllm.editor.hparams import default_neighbours_per_edit
    from memit_vllm.editor.preserve import neighbour_pool
    from memit_vllm.editor.refine import DeltaTerms, NeighbourDraws, Refiner

    tok, model, em = load(model_dir)
    hp, _ = default_hparams(model.config.model_type, em.n_layers, em.d_ff, n_edits=args.edits)
    hp = hp.replace(refine_steps=args.steps)
    reqs = load_requests(args.data, limit=args.edits)
    later = read_records(args.data)[args.edits:args.edits + NEIGHBOUR_SUBJECTS]  # only their subjects: never edited
    draws = NeighbourDraws(neighbour_pool(reqs, [parse_record(r, where).subject for where, r in later]),
                           rows=default_neighbours_per_edit(len(reqs)) * len(reqs))
    gen = torch.Generator().manual_seed(0)
    deltas = {l: 0.02 * torch.randn(em.d_model, em.d_ff, generator=gen) for l in hp.layers}
    print(f"machine: {machine()}; {len(reqs)} edits, {draws.rows} neighbour rows over {len(draws.subjects)} "
          f"subjects, layers {hp.layers}")
    print("| group cost (row-tokens) | prepare (s) | s per step |\n|---|---|---|")
    for cost in map(float, (args.group_costs or f"{BUCKET_OVERHEAD_TOKENS},inf").split(",")):
        refiner = Refiner(em, tok, hp, reqs, [], draws, file_corpus(CORPUS), seed=0, overhead_tokens=cost)
        terms = DeltaTerms(em, deltas)
        try:
            t = time.perf_counter()
            refiner.prepare(terms)
            prepared = time.perf_counter() - t
            for _ in range(args.steps):
                refiner.step(terms)
            per_step = (time.perf_counter() - t - prepared) / args.steps
        finally:
            terms.remove()
        print(f"| {cost:g} | {prepared:.1f} | {per_step:.1f} |", flush=True)


def covariance(args, model_dir):
    from memit_vllm.core.tokens import pad_id, pad_right
    from memit_vllm.editor import default_hparams
    from memit_vllm.editor.covariance import accumulate, resolve_corpus, token_batches
    from memit_vllm.editor.precision import computing_in

    tok, model, em = load(model_dir)
    hp, _ = default_hparams(model.config.model_type, em.n_layers, em.d_ff)
    corpus = resolve_corpus(str(CORPUS), em, tok, 0)
    batches = [pad_right(b, pad_id(tok)) for b in token_batches(tok, corpus, args.tokens)]
    n = sum(int(m.sum()) for _, m in batches)

    with torch.no_grad():
        t = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
        bare = time.perf_counter() - t
    passes = {}  # (model dtype, product dtype): layer_covariances' per-batch work, minus the cache write
    for model_dtype, products in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                  (torch.bfloat16, torch.bfloat16)):
        with computing_in(model, model_dtype):
            t = time.perf_counter()
            sums = {l: torch.zeros(em.d_ff, em.d_ff, dtype=torch.float64) for l in hp.layers}
            for ids, mask in batches:
                accumulate(em, ids, mask, sums, products)
            passes[model_dtype, products] = time.perf_counter() - t, sums
    _, fp32 = passes[torch.float32, torch.float32]
    print(f"machine: {machine()}; {n} tokens of {CORPUS.name}, layers {hp.layers}")
    print("| pass (statistics for all layers in one pass) | seconds | tokens/s | C_l vs fp32's (max rel. Frobenius) |\n"
          "|---|---|---|---|")
    print(f"| bare forward, all {em.n_layers} layers + LM head | {bare:.1f} | {n / bare:.0f} | - |")
    for (model_dtype, products), (seconds, sums) in passes.items():
        rel = max(float((sums[l] - fp32[l]).norm() / fp32[l].norm()) for l in hp.layers)
        name = f"model in {str(model_dtype)[6:]}, products in {str(products)[6:]}"
        print(f"| {name} | {seconds:.1f} | {n / seconds:.0f} | {rel:.1e} |")


def spectrum(args, model_dir):
    """Eigenvalues of each preset layer's C_l and, per AlphaEdit threshold, the directions its projection
    keeps and the share of the corpus key energy, tr(P C) / tr(C), that passes it (float64 eigvalsh of the
    make-patch statistics: computed once, then from the cache)."""
    from memit_vllm.cache import cache_dir
    from memit_vllm.checkpoint import Checkpoint
    from memit_vllm.editor import EditConfig, default_hparams
    from memit_vllm.editor.memit import statistics

    tok, model, em = load(model_dir)
    hp, _ = default_hparams(model.config.model_type, em.n_layers, em.d_ff)
    stats = statistics(em, tok, Checkpoint(model_dir), hp, EditConfig(stats_corpus=str(CORPUS)), cache_dir())
    thresholds = [float(x) for x in args.thresholds.split(",")]
    print(f"{CORPUS.name}, {stats.info[hp.layers[0]]['tokens']} tokens; per threshold: directions kept of "
          f"{em.d_ff} / energy passed")
    print("| layer | min | median | mean | max | " + " | ".join(f"{t:g}" for t in thresholds) + " |")
    print("|---|---|---|---|---|" + "---|" * len(thresholds))
    for layer in hp.layers:
        e = torch.linalg.eigvalsh(stats.covs[layer].double())
        cells = [f"{int((e < t).sum())} / {100 * float(e[e < t].sum() / e.sum()):.1f}%" for t in thresholds]
        print(f"| {layer} | {e[0]:.4f} | {e.median():.4f} | {e.mean():.4f} | {e[-1]:.2f} | " + " | ".join(cells) + " |")


def without_conflicts(path: str, n: int) -> Path:
    """The first n records of `path` that make-patch accepts together, as a temp file."""

    from memit_vllm.core.records import without_conflicts as keep

    kept, dropped = keep(path, n)
    out = Path(tempfile.mkdtemp()) / Path(path).name
    out.write_text(json.dumps(kept))
    print(f"{Path(path).name}: first {len(kept)} records without the {dropped} that conflict with an earlier one")
    return out


def saved_copy(model_dir: Path, dtype: str) -> Path:
    """The checkpoint saved again in `dtype` (tokenizer beside it), in a temporary directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(tempfile.mkdtemp()) / f"{model_dir.name}-{dtype}"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def scaling(args, model_dir):

    from memit_vllm.editor import EditConfig, edit, load_requests, parse_layers
    from memit_vllm.evaluate.run import evaluate

    overrides = json.loads(args.hparams) if args.hparams else None
    if args.saved_in:  # what a user of a bf16 checkpoint edits and serves: the weights rounded once
        model_dir = saved_copy(model_dir, args.saved_in)
    if args.drop_conflicts:
        args.data = str(without_conflicts(args.data, max(int(x) for x in args.sizes.split(","))))
    print(f"machine: {machine()}; layers {args.layers or 'preset'}, lambda {args.lam or 'preset'}, "
          f"hparams {overrides or 'preset'}, model dtype {args.dtype or 'as stored'}, "
          f"bucket overhead {args.bucket_overhead} tokens")
    print("| edits | stats (s) | neighbour names (s) | z (s) | update (s) | total (s) | peak RSS (GiB) | ES | PS | NS "
          "| NS before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",")]:
        reqs = load_requests(args.data, limit=size)
        result = edit(model_dir, reqs, EditConfig(stats_corpus=str(CORPUS), hparams=overrides,
                                                  layers=parse_layers(args.layers), mom2_update_weight=args.lam,
                                                  progress=args.progress, resume_dir=args.resume_dir,
                                                  dtype=args.dtype, bucket_overhead_tokens=args.bucket_overhead))
        s = result.report.seconds
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if torch.cuda.is_available():
            print(f"size {size}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        if args.save_dir:
            result.patch.save(Path(args.save_dir) / f"scaling-{size}.patch")
        scores = ["-"] * 4
        if args.eval:
            with tempfile.TemporaryDirectory() as d:
                ev = evaluate(str(model_dir), args.data, [result.patch.save(Path(d) / "p.patch")], n=size)
            scores = [f"{ev['after'][k]:.3f}" for k in ("ES", "PS", "NS")] + [f"{ev['before']['NS']:.3f}"]
        print(f"| {size} | {s['stats']:.1f} | {s.get('neighbour_names', 0.0):.1f} | {s['z']:.1f} | "
              f"{s['update']:.1f} | {s['total']:.1f} | {rss:.2f} | "
              + " | ".join(scores) + " |", flush=True)


def repeat(args, model_dir):
    from memit_vllm.patch import load_patch

    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "memit_vllm", "make-patch", "--model", str(model_dir),
               "--requests", args.data, "--limit", str(args.edits), "--stats-corpus", str(CORPUS)]
        if args.hparams:
            Path(d, "hp.json").write_text(args.hparams)
            cmd += ["--hparams", str(Path(d, "hp.json"))]
        print(f"machine: {machine()}; {args.edits} edits of {Path(args.data).name}, hparams {args.hparams or 'preset'}")
        runs = []
        for i in range(2):
            out = Path(d, f"run{i}.patch")
            t = time.monotonic()
            subprocess.run([*cmd, "--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
                                "SOURCE_DATE_EPOCH": "1700000000"})  # pins `created`, the one field that may differ
            runs.append((out, time.monotonic() - t))
        (a, ta), (b, tb) = runs
        same = a.read_bytes() == b.read_bytes()
        print(f"runs: {ta:.0f} s and {tb:.0f} s; patch files identical: {'yes' if same else 'NO'}")
        if not same:
            pa, pb = load_patch(a), load_patch(b)
            diff = {k: float((pa.deltas[k].double() - pb.deltas[k].double()).abs().max()) for k in pa.deltas}
            print(f"patch ids {pa.patch_id} / {pb.patch_id}; max |delta difference| per tensor: {json.dumps(diff)}")
            raise SystemExit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["z-speed", "covariance", "scaling", "spectrum", "repeat", "refine-speed"])
    ap.add_argument("--thresholds", default="5e-3,1e-2,2e-2", help="spectrum: AlphaEdit thresholds to tabulate")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the prepared smollm2-135m)")
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="refine-speed: steps timed per group cost")
    ap.add_argument("--tokens", type=int, default=50000)
    ap.add_argument("--sizes", default="10,100")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact_500.json"))
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--group-costs", help="z-speed, refine-speed: time the batched path alone for each of these "
                    "per-group costs of the length grouping, e.g. 0,32,64,128,1e9 (1e9: one group)")
    ap.add_argument("--z-variants", help="z-speed: the batched path alone (all edits in one batch unless "
                    "z_batch_edits is given) for each of "
                    "these JSON hparams overrides, e.g. '[{}, {\"z_dtype\": \"bfloat16\"}, {\"v_lr\": 2.0}]'")
    ap.add_argument("--drop-conflicts", action="store_true",
                    help="skip records that ask an earlier record's prompt for another target")
    ap.add_argument("--save-dir", help="also keep each size's patch here as scaling-N.patch")
    ap.add_argument("--resume-dir", help="scaling: keep finished z batches here; a rerun resumes")
    ap.add_argument("--bucket-overhead", type=float, default=BUCKET_OVERHEAD_TOKENS,
                    help="scaling: make-patch's bucket_overhead_tokens (inf: z and key reads batched in request "
                         "order, as before session 24's length batches of key reads)")
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr (for long sizes)")
    ap.add_argument("--layers", help="override the preset's layers, e.g. 4-8")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="scaling: edit the model in this dtype (make-patch --dtype); scores always in fp32")
    ap.add_argument("--saved-in", choices=["bfloat16", "float16"],
                    help="scaling: edit and score a copy of the model saved in this dtype (a bf16 checkpoint)")
    ap.add_argument("--lambda", dest="lam", type=float, help="override lambda (mom2_update_weight)")
    ap.add_argument("--hparams", help="JSON of other overrides, e.g. '{\"v_num_grad_steps\": 25}'")
    args = ap.parse_args()
    model_dir = Path(args.model) if args.model else prepare("smollm2-135m")
    {"z-speed": z_speed, "covariance": covariance, "scaling": scaling, "spectrum": spectrum,
     "repeat": repeat, "refine-speed": refine_speed}[args.what](args, model_dir)


if __name__ == "__main__":
    main()
