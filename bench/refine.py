"""Refine a patch's deltas jointly in the output space (issue 18, session 30 spike).

MEMIT solves each layer in turn against a second-order proxy of what it disturbs (lambda C and the held
keys); session 23 found that the layers' own leaks add up to well under half of the measured held-out KL:
the rest is the layers compounding, which no per-layer term sees. Here all edited layers' deltas, started
from a patch, take a few Adam steps together on the model's outputs:

    CE of each edit's new target after its rewrite prompt
    + w_n * KL(unedited || edited) of the next token after neighbour prompts (other subjects asked the
      edits' relations: make-patch's own neighbour prompts, e.g. bench/neighbour_files.py's file)
    + w_c * KL(unedited || edited) at every position of corpus texts (the first texts of the statistics
      corpus: never the held-out slice that eval's KL reads)

and the refined patch is written for `memit-vllm eval --generate` to score on its own prompts.

    .venv/bin/python bench/refine.py /work/benchout/c28/default100.patch --neighbours names_only.json \\
        --out refined.patch --steps 30 --w-neighbours 30 --w-corpus 30
    memit-vllm eval --model smollm2-135m --data ../shared/data/counterfact/counterfact_500.json --n 100 \\
        --patch refined.patch --generate --unrelated-count 400

(names_only.json: the patch's own neighbour prompts, `bench/neighbour_files.py --edits 100 --out DIR answers`
writes them.)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_vllm.core.records import parse_record, read_prompts
from memit_vllm.core.tokens import pad_id, pad_right, target_ids
from memit_vllm.default_models import prepare
from memit_vllm.editor.covariance import file_corpus
from memit_vllm.patch import load_patch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "smollm2_self_2k.jsonl"


def batches(seqs: list[list[int]], size: int, pad: int):
    """(ids, attention mask, index of each row's last token) of right-padded batches of `size` rows."""
    for i in range(0, len(seqs), size):
        ids, mask = pad_right(seqs[i:i + size], pad)
        yield ids, mask, mask.sum(1) - 1


def hidden(model, ids, mask):
    return model.model(input_ids=ids, attention_mask=mask).last_hidden_state


def last_logprobs(model, seqs, pad, size=64):
    """Next-token log-probabilities after each sequence's last token."""
    out = []
    for ids, mask, last in batches(seqs, size, pad):
        h = hidden(model, ids, mask)[torch.arange(len(last)), last]
        out.append(F.log_softmax(model.lm_head(h).float(), -1))
    return torch.cat(out)


def corpus_logprobs(model, texts: torch.Tensor, size=8):
    out = []
    for i in range(0, len(texts), size):
        ids = texts[i:i + size]
        out.append(F.log_softmax(model.lm_head(hidden(model, ids, torch.ones_like(ids))).float(), -1).flatten(0, 1))
    return torch.cat(out)


def kl(base: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    return (base.exp() * (base - edited)).sum(-1).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("patch")
    ap.add_argument("--model", default="smollm2-135m", help="the patch's base: a default model's name")
    ap.add_argument("--neighbours", required=True, help="a --preserve-style prompts file (JSON list / JSONL)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--w-neighbours", type=float, default=1.0)
    ap.add_argument("--w-corpus", type=float, default=1.0)
    ap.add_argument("--neighbour-batch", type=int, default=250)
    ap.add_argument("--corpus-texts", type=int, default=16, help="corpus texts per step")
    ap.add_argument("--corpus-pool", type=int, default=512, help="the first N corpus texts, sampled from")
    ap.add_argument("--corpus-tokens", type=int, default=64)
    ap.add_argument("--ce-floor", type=float, default=0.0,
                    help="the edits' CE counts only above this (e.g. the patch's own CE: edits held as strong as "
                         "they came, the steps spent on the KLs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    patch = load_patch(args.patch)
    folder = prepare(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    model.requires_grad_(False)
    pad = pad_id(tok)

    edits = [parse_record(r, f"request {i}") for i, r in enumerate(patch.requests)]
    prompt_ids = [tok(r.text())["input_ids"] for r in edits]
    new_ids = [target_ids(tok, r.target_new) for r in edits]
    neighbours = [tok(p["prompt"])["input_ids"] for p in read_prompts(args.neighbours, "--neighbours")]
    texts = []
    for text in file_corpus(CORPUS).texts():
        ids = tok(text)["input_ids"]
        if len(ids) >= args.corpus_tokens:
            texts.append(ids[:args.corpus_tokens])
        if len(texts) == args.corpus_pool:
            break
    texts = torch.tensor(texts)

    deltas, edited = {}, [True]  # edited[0] False: the unedited model, for the reference distributions
    for name, delta in patch.deltas.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        w0, d = module.weight.detach(), torch.nn.Parameter(delta.detach().float().clone())
        module.forward = lambda x, w0=w0, d=d: F.linear(x, w0 + d) if edited[0] else F.linear(x, w0)
        deltas[name] = d

    def unedited(fn, *a):
        edited[0] = False
        try:
            with torch.no_grad():
                return fn(*a)
        finally:
            edited[0] = True
    # The unedited next-token distributions of the neighbour prompts, once (they cannot change); the corpus
    # pool's would take 6 GiB at the defaults, so a step's drawn texts are read on the unedited model instead.
    unedited_n = unedited(last_logprobs, model, neighbours, pad)
    opt = torch.optim.Adam(deltas.values(), lr=args.lr)
    seqs = [p + t for p, t in zip(prompt_ids, new_ids)]

    def edit_loss():
        total, count = 0.0, 0
        for start in range(0, len(seqs), 50):
            part = seqs[start:start + 50]
            h = hidden(model, *pad_right(part, pad))
            for row, i in enumerate(range(start, start + len(part))):
                n_p, n_t = len(prompt_ids[i]), len(new_ids[i])
                logits = model.lm_head(h[row, n_p - 1:n_p - 1 + n_t])
                total = total + F.cross_entropy(logits, torch.tensor(new_ids[i]), reduction="sum")
                count += n_t
        return total / count

    for step in range(args.steps + 1):
        start = time.perf_counter()
        pick = torch.randperm(len(neighbours))[:args.neighbour_batch]
        chunk = texts[torch.randperm(len(texts))[:args.corpus_texts]]
        ce = edit_loss()
        kl_n = kl(unedited_n[pick], last_logprobs(model, [neighbours[i] for i in pick.tolist()], pad))
        kl_c = kl(unedited(corpus_logprobs, model, chunk), corpus_logprobs(model, chunk))
        loss = F.relu(ce - args.ce_floor) + args.w_neighbours * kl_n + args.w_corpus * kl_c
        print(f"step {step}: CE {ce.item():.4f}  KL neighbours {kl_n.item():.4f}  KL corpus {kl_c.item():.4f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if step == args.steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    refined = replace(patch, deltas={n: d.detach().clone() for n, d in deltas.items()}, path=None,
                      name=(patch.name or "patch") + "-refined")
    print("written", refined.save(args.out))


if __name__ == "__main__":
    main()
