"""One evaluation: score the data set before and after the patches, in memory or through servers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import Checkpoint
from ..core.records import CounterFactRecord, ZsreRecord, read_dataset
from ..errors import MemitError
from ..patch import load_patch
from ..patch.merge import PatchSet
from .metrics import COUNTERFACT_METRICS, ZSRE_METRICS, CounterFactScores, counterfact_metrics, zsre_metrics


def measure_counterfact(scorer, records: Sequence[CounterFactRecord], fluency: bool = False) -> dict[str, float]:
    """All comparisons of all records go to the scorer at once, so it can batch across records."""
    pairs: list[tuple[str, str]] = []
    spans = []  # per record: slices of `pairs` for rewrite, paraphrase, neighborhood (new, true interleaved)
    for r in records:
        groups = [([r.rewrite_prompt], r.target_true), (r.paraphrase_prompts, r.target_true),
                  (r.neighborhood_prompts, r.neighborhood_true)]
        record_spans = []
        for prompts, true in groups:
            start = len(pairs)
            for prompt in prompts:
                pairs += [(prompt, r.target_new), (prompt, true)]
            record_spans.append((start, len(pairs)))
        spans.append(record_spans)
    nll = [s.nll for s in scorer.score(pairs, desc="counterfact")]

    def comparisons(span):
        start, stop = span
        return [(nll[i], nll[i + 1]) for i in range(start, stop, 2)]

    generations = None
    if fluency:
        texts = scorer.generate([p for r in records for p in r.generation_prompts], desc="fluency")
        generations, at = [], 0
        for r in records:
            generations.append(texts[at:at + len(r.generation_prompts)])
            at += len(r.generation_prompts)
    scores = [CounterFactScores(rewrite=comparisons(rw)[0], paraphrase=comparisons(pp), neighborhood=comparisons(nb),
                                generations=generations[i] if generations else None)
              for i, (rw, pp, nb) in enumerate(spans)]
    return counterfact_metrics(scores)


def measure_zsre(scorer, records: Sequence[ZsreRecord]) -> dict[str, float]:
    n = len(records)
    pairs = ([(r.src, r.target) for r in records] + [(r.rephrase, r.target) for r in records]
             + [(r.loc, r.loc_ans) for r in records])
    acc = [s.acc for s in scorer.score(pairs, desc="zsre")]
    return zsre_metrics(acc[:n], acc[n:2 * n], acc[2 * n:])


def evaluate(model: str, data: str | Path, patches: Sequence[str | Path] = (), n: int | None = None,
             fmt: str = "auto", zsre_target: str = "answers", fluency: bool = False, batch_size: int = 16,
             device: str | None = None, progress: bool = False, backend: str = "transformers",
             server: str | None = None, base_server: str | None = None) -> dict:
    """Metrics before and/or after the patches as one JSON-ready dict; see README "Evaluation".

    backend "transformers" scores the base model, merges the patches in memory and scores again.
    backend "vllm" scores through running servers: `server` must serve exactly `patches` (checked
    by patch id), and gives "after" (or "before" without patches); `base_server`, serving no
    patches, gives "before" when patches are given (without it there is no "before").
    """
    from .patching import patch_info

    # Everything cheap and checkable goes first: a bad input fails before minutes of scoring.
    fmt, records = read_dataset(data, n, fmt, zsre_target)
    if fluency and not all(isinstance(r, CounterFactRecord) and r.generation_prompts for r in records):
        raise MemitError("fluency needs generation_prompts: only the full CounterFact format has them")
    checkpoint = Checkpoint(model)
    loaded = [load_patch(p) for p in patches]
    if loaded:
        PatchSet(loaded).validate(checkpoint)

    def measure(scorer):
        if fmt == "zsre":
            return measure_zsre(scorer, records)
        return measure_counterfact(scorer, records, fluency)

    descriptions = ZSRE_METRICS if fmt == "zsre" else COUNTERFACT_METRICS
    result = {
        "model": model, "model_path": str(checkpoint.path), "architecture": checkpoint.architecture,
        "data": str(Path(data).resolve()), "format": fmt, "n": len(records), "backend": backend,
        "patches": [patch_info(p) for p in loaded], "fluency": fluency,
        **({"zsre_target": zsre_target} if fmt == "zsre" else {}),
    }
    if backend == "transformers":
        import torch

        from .patching import load_model, merge_into_model
        from .scoring import TransformersScorer

        result["device"] = device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        hf_model, tokenizer = load_model(checkpoint, device)
        scorer = TransformersScorer(hf_model, tokenizer, batch_size=batch_size, progress=progress)
        result["before"] = measure(scorer)
        if loaded:
            merge_into_model(hf_model, checkpoint, loaded)
            result["after"] = measure(scorer)
    elif backend == "vllm":
        from transformers import AutoTokenizer

        from .served import ServedScorer

        if not server:
            raise MemitError("the vllm backend needs --server URL (e.g. of `memit-vllm serve M --memit-patch P`)")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        phases = [("after" if loaded else "before", server, [p.patch_id for p in loaded])]
        if base_server and loaded:
            phases.insert(0, ("before", base_server, []))
        for phase, url, expected in phases:
            scorer = ServedScorer(url, tokenizer, batch_size=batch_size, progress=progress)
            served = scorer.served_patch_ids()
            if served != expected:
                raise MemitError(f"the server at {url} serves patches {served or 'none'}, but the {phase} "
                                 f"scores need {expected or 'none'}: start it with exactly those patches")
            result[f"{phase}_server"] = url
            result[phase] = measure(scorer)
    else:
        raise MemitError(f"unknown backend {backend!r}; expected transformers or vllm")
    if "before" in result and "after" in result:
        result["delta"] = {k: result["after"][k] - v for k, v in result["before"].items()}
    shown = result.get("before", result.get("after"))
    result["metrics"] = {k: v for k, v in descriptions.items() if k in shown}
    return result
