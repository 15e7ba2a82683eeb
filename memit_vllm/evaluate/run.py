"""One evaluation: score the data set before and after the patches, in memory or through servers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import Checkpoint
from ..core.records import CounterFactRecord, ZsreRecord, read_dataset
from ..errors import MemitError
from ..patch import load_patch
from ..patch.merge import PatchSet
from .generation import NEW_TOKENS, generation_task, heldout_texts, served_kl, unrelated_prompts
from .metrics import (
    COUNTERFACT_METRICS,
    GENERATION_METRICS,
    ZSRE_METRICS,
    CounterFactScores,
    counterfact_metrics,
    zsre_metrics,
)


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
             server: str | None = None, base_server: str | None = None, generate: bool = False,
             new_tokens: int = NEW_TOKENS, unrelated: str | Path | None = None, unrelated_count: int | None = None,
             heldout: str | Path | None = None) -> dict:
    """Metrics before and/or after the patches as one JSON-ready dict; see README "Evaluation".

    backend "transformers" scores the base model, merges the patches in memory and scores again.
    backend "vllm" scores through running servers: `server` must serve exactly `patches` (checked
    by patch id), and gives "after" (or "before" without patches); `base_server`, serving no
    patches, gives "before" when patches are given (without it there is no "before"). A server is
    `URL[:MODEL]` (MODEL: which of its models, e.g. a `--memit-variant`).

    `generate` adds the generated metrics (`generation` module): completions of `new_tokens`, the
    `unrelated` prompts file (default: `unrelated_count` records after the first n), KL on `heldout` text.
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

    if generate:
        prompts, source = unrelated_prompts(data, fmt, records, loaded, unrelated, unrelated_count)
        if heldout is not None:
            heldout_texts(heldout)  # a bad file fails here, before the model loads

        def plan(tokenizer):
            return generation_task(tokenizer, fmt, records, prompts, source, heldout, loaded, new_tokens)

    def measure(scorer):
        if fmt == "zsre":
            return measure_zsre(scorer, records)
        return measure_counterfact(scorer, records, fluency)

    descriptions = {**(ZSRE_METRICS if fmt == "zsre" else COUNTERFACT_METRICS),
                    **(GENERATION_METRICS if generate else {})}
    generated, kl = {}, {}  # phase -> completions; metric -> value
    result = {
        "model": model, "model_path": str(checkpoint.path), "architecture": checkpoint.architecture,
        "data": str(Path(data).resolve()), "format": fmt, "n": len(records), "backend": backend,
        "patches": [patch_info(p) for p in loaded], "fluency": fluency,
        **({"zsre_target": zsre_target} if fmt == "zsre" else {}),
    }
    if backend == "transformers":
        from ..editor.devicemap import resolve_device
        from .patching import load_model, merge_into_model, swapped
        from .scoring import TransformersScorer

        device = resolve_device(device)
        result["device"] = str(device)
        hf_model, tokenizer = load_model(checkpoint, device)
        task = plan(tokenizer) if generate else None
        scorer = TransformersScorer(hf_model, tokenizer, batch_size=batch_size, progress=progress)
        result["before"] = measure(scorer)
        if task:
            generated["before"] = task.complete(scorer)
        if loaded:
            unedited = merge_into_model(hf_model, checkpoint, loaded)
            result["after"] = measure(scorer)
            if task:
                generated["after"] = task.complete(scorer)
                if task.heldout:
                    kl["heldout_kl"], kl["heldout_kl_top20"] = scorer.heldout_kl(
                        task.heldout, lambda: swapped(hf_model, unedited))
    elif backend == "vllm":
        from transformers import AutoTokenizer

        from .served import ServedScorer, split_endpoint

        if not server:
            raise MemitError("the vllm backend needs --server URL (e.g. of `memit-vllm serve M --memit-patch P`)")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        task = plan(tokenizer) if generate else None
        phases = [("after" if loaded else "before", ("--server", server), [p.patch_id for p in loaded])]
        if base_server and loaded:
            phases.insert(0, ("before", ("--base-server", base_server), []))
        scorers = {}
        for phase, (flag, spec), expected in phases:
            url, model_name = split_endpoint(flag, spec)
            scorer = scorers[phase] = ServedScorer(url, tokenizer, batch_size=batch_size, progress=progress,
                                                   model=model_name)
            served = scorer.served_patch_ids()
            if served != expected:
                raise MemitError(f"the server at {spec} serves patches {served or 'none'}, but the {phase} "
                                 f"scores need {expected or 'none'}: start it with exactly those patches")
            result[f"{phase}_server"] = spec
            result[phase] = measure(scorer)
            if task:
                generated[phase] = task.complete(scorer)
        if task and task.heldout and len(scorers) == 2:
            kl["heldout_kl_top20"] = served_kl(scorers["before"], scorers["after"], task.heldout)
    else:
        raise MemitError(f"unknown backend {backend!r}; expected transformers or vllm")
    if generate:
        result["generation"] = task.info
        reference = generated.get("before")
        if reference:
            task.info["unrelated_confident"] = task.confident(reference)
            result["before"] |= task.metrics(reference, reference) | dict.fromkeys(kl, 0.0)
        if "after" in generated:
            result["after"] |= task.metrics(generated["after"], reference) | kl
    if "before" in result and "after" in result:
        result["delta"] = {k: result["after"][k] - v for k, v in result["before"].items()}
    shown = result.get("before", result.get("after"))
    result["metrics"] = {k: v for k, v in descriptions.items() if k in shown}
    return result
