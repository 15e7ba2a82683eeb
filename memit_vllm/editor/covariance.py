"""Second moments C_l = E[k k^T] of the down-projection inputs, for all edited layers in ONE pass.

The reference makes one corpus pass per layer; here one forward per batch feeds every edited layer
and stops at the deepest one's keys. Sums are accumulated in float64 (products in float32 unless
mom2_dtype is float64; the model may run in bfloat16 for the pass: hparams mom2_model_dtype) and
cached on disk per layer, keyed by model content, corpus identity, token budget, dtype and the model's
dtype (`stats_identity`, also the identity of a stats file: stats_file.py), so a second
make-patch (or one with other layers) reuses what was computed. A pass can be split into shards
(`Shard`: other machines, or the ranks of torch.distributed) whose sums add up to the one-pass sums.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..core.files import atomic_file
from ..core.tokens import pad_id, pad_right
from ..errors import MemitError
from . import distributed
from .arch import EditableModel
from .trace import capture

SELF_OPENERS = ["The", "In", "A", "It", "When", "This", "One", "There", "After", "We", "As", "For", "If",
                "On", "At", "Many", "Some", "Today", "Our", "His"]
MAX_SEQ = 512
BATCH_TOKENS = 8192


@dataclass
class Corpus:
    identity: str  # what the cache key says about the corpus
    texts: Callable[[], Iterator[str]]
    description: str


def file_corpus(path: Path) -> Corpus:
    """A local .txt (blank-line separated) or .jsonl ({"text": ...} per line) corpus, identified by its hash."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def texts():
        if path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise MemitError(f"{path} line {i + 1}: expected a JSON object with a 'text' field") from e
        else:  # plain text: one document per blank-line separated block
            for block in path.read_text(encoding="utf-8").split("\n\n"):
                if block.strip():
                    yield block.strip()

    return Corpus(f"file:{digest}", texts, f"{path} (sha256 {digest[:12]})")


def _hf_corpus(spec: str, flag: str) -> Corpus:
    name, _, config = spec.partition(":")
    if name in ("wikitext-103", "wikitext"):
        name, config = "wikitext", config or "wikitext-103-raw-v1"
    try:
        import datasets
    except ImportError as e:
        raise MemitError(f"{flag} {spec!r} needs the `datasets` package (pip install datasets), "
                         "or give a local .txt/.jsonl file or self:N") from e

    def texts():
        try:
            ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        except Exception as e:
            raise MemitError(f"cannot load dataset {spec!r} ({e}); offline? use a local file or self:N") from e
        for rec in ds:
            if rec.get("text", "").strip():
                yield rec["text"]

    return Corpus(f"hf:{name}:{config}", texts, f"HF dataset {name} ({config})")


def corpus_spec(source: str | None, flag: str = "--stats-corpus") -> tuple[str, int | Path | str]:
    """("self", N), ("file", path) or ("hf", name) of a corpus given as `flag` (None: the default), checked
    without the model: a bad one fails before the model loads, not after."""
    if source is None:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            import datasets  # noqa: F401
            source = "self:1000" if offline else "wikitext-103"
        except ImportError:
            source = "self:1000"
    if source.startswith("self:"):
        n = source[5:]
        if not n.isdigit() or int(n) < 1:
            raise MemitError(f"{flag} {source!r}: expected self:N with N an integer >= 1")
        return "self", int(n)
    path = Path(source)
    if path.exists():
        if not path.is_file() or path.suffix not in (".txt", ".jsonl"):
            raise MemitError(f"{flag} {source}: local corpora are .txt or .jsonl files")
        return "file", path
    if source.startswith((".", "/", "~")) or source.endswith((".txt", ".jsonl")):
        raise MemitError(f"{flag} {source}: no such file")
    return "hf", source


def resolve_corpus(source: str | None, em: EditableModel, tok, seed: int, flag: str = "--stats-corpus") -> Corpus:
    """A local .txt/.jsonl file, `self:N` (text sampled from the model), or an HF dataset name."""
    kind, value = corpus_spec(source, flag)
    if kind == "self":
        # Sampling follows the device's RNG: text sampled on a GPU is another corpus than on the CPU.
        device = "" if em.output_device.type == "cpu" else f":{em.output_device.type}"
        return Corpus(f"self:{value}:seed{seed}{device}", lambda: _sample_self(em, tok, value, seed),
                      f"{value} sequences sampled from the model (seed {seed}{device})")
    return file_corpus(value) if kind == "file" else _hf_corpus(value, flag)


@torch.no_grad()
def _sample_self(em: EditableModel, tok, n: int, seed: int, batch: int = 32, new_tokens: int = 128):
    torch.manual_seed(seed)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, n, batch):
            openers = [SELF_OPENERS[i % len(SELF_OPENERS)] for i in range(start, min(n, start + batch))]
            enc = tok(openers, return_tensors="pt", padding=True).to(em.output_device)
            out = em.model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                    max_new_tokens=new_tokens, pad_token_id=pad_id(tok))
            yield from tok.batch_decode(out, skip_special_tokens=True)
    finally:
        tok.padding_side = side


@dataclass(frozen=True)
class Shard:
    """Part `index` of `count` of a corpus pass: the token batches j with j % count == index. The batches
    are cut from the whole stream (budget included) before the split, so each batch, and the float32
    product it adds, is the same in any split: shards add up to the one-pass sums but for the order of
    the float64 additions."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """`i/N` with 0 <= i < N, as --shard takes it."""
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError as e:
            raise MemitError(f"--shard {text!r}: expected i/N, e.g. 0/4 for the first of 4 shards") from e
        if not 0 <= index < count:
            raise MemitError(f"--shard {text!r}: i must be in 0..N-1")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def within(self, rank: int, world: int) -> "Shard":
        """This shard's batches split again among `world` workers, every world-th to worker `rank`."""
        return Shard(self.index + self.count * rank, self.count * world)


IDENTITY_KEYS = ("model", "corpus", "budget", "dtype", "d_ff")  # every identity has these
FORWARD = "forward"  # and this one only when the model ran in a reduced precision (absent: float32)


def stats_identity(model_sha: str, corpus_identity: str, budget: int | None, dtype: str, d_ff: int,
                   forward: torch.dtype = torch.float32) -> dict[str, str]:
    """What statistics were computed from: the one identity of cache entries and stats files. Keys read
    by a reduced-precision forward (make-patch --dtype or --stats-model-dtype) are other statistics:
    `forward` names it then (an fp32 identity stays as it always was, so existing entries keep their key)."""
    identity = dict(zip(IDENTITY_KEYS, (model_sha, corpus_identity, str(budget), dtype, str(d_ff))))
    if forward != torch.float32:
        identity[FORWARD] = str(forward).removeprefix("torch.")
    return identity


def _cache_file(cache: Path, identity: dict[str, str], layer: int) -> Path:
    fields = [identity[k] for k in ("corpus", "budget", "dtype", FORWARD) if k in identity]
    key = hashlib.sha256("|".join(fields).encode()).hexdigest()[:24]
    return cache / "stats" / identity["model"][:24] / key / f"layer{layer}.safetensors"


def token_batches(tok, corpus: Corpus, budget: int | None, shard: Shard = Shard()) -> Iterator[list[list[int]]]:
    """Token id sequences in batches of about BATCH_TOKENS, stopping exactly at the budget; only the
    batches of `shard` are yielded (every text is still tokenised: that decides where batches end)."""
    def sequences():
        used = 0
        for text in corpus.texts():
            ids = tok(text, truncation=True, max_length=MAX_SEQ)["input_ids"]
            if budget is not None:
                ids = ids[: budget - used]
            if not ids:
                continue
            used += len(ids)
            yield ids
            if budget is not None and used >= budget:
                break

    for j, batch in enumerate(packed(sequences(), BATCH_TOKENS)):
        if j % shard.count == shard.index:
            yield batch


def packed(sequences: Iterable[list[int]], budget: int) -> Iterator[list[list[int]]]:
    """`sequences`, in order, in runs of at most `budget` padded tokens (one sequence at least): the widest
    sequence times the count, as pad_right lays a run out."""
    batch, width = [], 0
    for ids in sequences:
        if batch and max(width, len(ids)) * (len(batch) + 1) > budget:
            yield batch
            batch, width = [], 0
        batch.append(ids)
        width = max(width, len(ids))
    if batch:
        yield batch


GRAM_BLOCKS = 4  # k^T k is symmetric: its upper block triangle only, 10 of 16 blocks of the product


def add_gram(total: torch.Tensor, k: torch.Tensor) -> None:
    """total += k^T k (float64 total, products in k's dtype), computing only the blocks on and above the
    diagonal; each block is a plain matmul over all rows, as k.T @ k computes it."""
    d = k.shape[1]
    edges = [round(i * d / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    for a, b in zip(edges, edges[1:]):
        block = (k[:, a:b].T @ k[:, a:]).to(torch.float64)  # rows a:b, columns a:d
        total[a:b, a:] += block
        total[b:, a:b] += block[:, b - a:].T


def accumulate(em: EditableModel, ids: torch.Tensor, mask: torch.Tensor, sums: dict[int, torch.Tensor],
               dtype: torch.dtype = torch.float32) -> int:
    """Add k^T k of one batch's real tokens to sums[layer] (float64) for every layer; return the token count."""
    got = capture(em, ids, mask, keys=list(sums))
    real = mask.bool()
    for layer, total in sums.items():
        add_gram(total, got.keys[layer][real.to(got.keys[layer].device)].to(total.device, dtype))
    return int(real.sum())


def corpus_sums(em: EditableModel, tok, layers: list[int], corpus: Corpus, budget: int | None, dtype: str,
                shard: Shard = Shard(), progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """One pass over the batches of `shard` (split again among the ranks under torch.distributed, and
    summed over them): the float64 sum of k k^T for each layer, and the number of tokens."""
    acc_dtype = getattr(torch, dtype)
    sums = {l: torch.zeros(em.d_ff, em.d_ff, dtype=torch.float64, device=em.device_of(l)) for l in layers}
    count, part = 0, shard.within(distributed.rank(), distributed.world())
    bar = tqdm(total=budget if part.count == 1 else None, desc="covariance", unit="tok", unit_scale=True,
               disable=not progress)
    for batch in token_batches(tok, corpus, budget, part):
        n = accumulate(em, *pad_right(batch, pad_id(tok)), sums, acc_dtype)
        count += n
        bar.update(n)
    bar.close()
    sums, count = distributed.sum_over_ranks(sums, count)
    if count == 0:
        where = "" if shard.count == 1 else f"shard {shard} of "
        raise MemitError(f"covariance corpus {where}{corpus.description} yielded no tokens" +
                         (": it has fewer batches than shards; use fewer shards" if shard.count > 1 else ""))
    return sums, count


def read_checked(f: Path, identity: dict[str, str], names: tuple[str, ...],
                 shape: tuple[int, ...]) -> tuple[dict | None, str]:
    """The tensors `names` of a cache entry (the first of `shape`), or None and what is wrong with it:
    damaged, or not what its key says (its metadata holds `identity`). Also the z store's reader."""
    try:
        with safe_open(f, "pt") as st:
            meta = st.metadata() or {}
            got = {name: st.get_tensor(name) for name in names}
    except Exception as e:  # truncated, empty, not safetensors, missing tensors: all mean "recompute"
        return None, f"it cannot be read ({type(e).__name__})"
    first = got[names[0]]
    problem = ("its identity differs" if any(meta.get(k) != v for k, v in identity.items()) else
               f"its shape is {tuple(first.shape)}" if tuple(first.shape) != shape else
               "it holds NaN or Inf" if not all(torch.isfinite(t.double()).all() for t in got.values()) else None)
    return (None if problem else got), problem


def _read_entry(f: Path, identity: dict[str, str], d_ff: int) -> tuple[torch.Tensor, int] | None:
    """(C_l, token count) of a cache entry, or None (with a warning) when it is damaged or is not what its
    key says: such an entry is recomputed, never trusted and never fatal."""
    got, problem = read_checked(f, identity, ("mom2_sum", "count"), (d_ff, d_ff))
    if got is not None:
        n = int(got["count"].item())
        if n > 0:
            return got["mom2_sum"].div_(n), n
        problem = "its token count is not positive"
    warnings.warn(f"covariance cache entry {f}: {problem}; recomputing it", stacklevel=3)
    return None


@contextmanager
def _locked(directory: Path):
    """One process computes an entry at a time: others wait here, then find it in the cache."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def layer_covariances(em: EditableModel, tok, layers: list[int], corpus: Corpus, identity: dict[str, str],
                      budget: int | None, dtype: str, cache: Path, progress: bool = True) -> tuple[dict, dict]:
    """C_l (float64) for each layer, from the cache where present and sound; one corpus pass for the rest.
    `identity` (stats_identity of this corpus, budget and dtype) keys the cache entries."""
    files = {l: _cache_file(cache, identity, l) for l in layers}
    ids = {l: {**identity, "layer": str(l)} for l in layers}
    out, info = {}, {}

    def from_cache(todo):  # under torch.distributed, a layer missing on any rank is computed by all
        for layer in todo:
            got = _read_entry(files[layer], ids[layer], em.d_ff) if files[layer].is_file() else None
            if got is not None:
                out[layer], info[layer] = got[0], {"tokens": got[1], "cached": True}
        return [l for l, missing in zip(todo, distributed.any_rank([l not in out for l in todo])) if missing]

    todo = from_cache(layers)
    if not todo:
        return out, info
    with _locked(files[todo[0]].parent) if distributed.is_main() else nullcontext():
        todo = from_cache(todo)  # another run may have computed them while this one waited
        if not todo:
            return out, info
        start = time.monotonic()
        sums, count = corpus_sums(em, tok, todo, corpus, budget, dtype, progress=progress)
        seconds = time.monotonic() - start
        for l in todo:
            if distributed.is_main():
                with atomic_file(files[l]) as tmp:
                    save_file({"mom2_sum": sums[l].cpu(), "count": torch.tensor([count], dtype=torch.float64)},
                              str(tmp), metadata=ids[l])
            out[l] = sums.pop(l).div_(count)  # in place: a d_ff x d_ff float64 copy is 1.6 GB at 8B
            info[l] = {"tokens": count, "cached": False, "seconds": round(seconds, 2)}
    return out, info


def layer_projections(covs: dict[int, torch.Tensor], threshold: float, layers: list[int], cache: Path,
                      identity: dict[str, str]) -> dict[int, torch.Tensor]:
    """AlphaEdit's null-space projection of each C_l (float64), cached beside the covariance it comes from
    (`identity`: stats_identity) under the same key plus the threshold (an eigendecomposition of d_ff x
    d_ff per layer). Entries are checked like the covariance's and recomputed when unsound; no lock: the
    result is deterministic and written atomically, so concurrent runs at worst compute it twice."""
    from .solve import nullspace_projection

    out = {}
    for layer in layers:
        f = _cache_file(cache, identity, layer)
        f = f.with_name(f"layer{layer}.nullspace-{threshold!r}.safetensors")
        key = {**identity, "layer": str(layer), "threshold": repr(threshold)}
        d_ff = covs[layer].shape[0]
        got, problem = read_checked(f, key, ("projection",), (d_ff, d_ff)) if f.is_file() else (None, None)
        if got is not None:
            out[layer] = got["projection"]
            continue
        if problem:
            warnings.warn(f"null-space projection cache entry {f}: {problem}; recomputing it", stacklevel=2)
        out[layer] = nullspace_projection(covs[layer], threshold).cpu()
        if distributed.is_main():
            with atomic_file(f) as tmp:
                save_file({"projection": out[layer]}, str(tmp), metadata=key)
    return out
