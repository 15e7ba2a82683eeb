"""`memit-vllm ab`: two served arms (endpoint + model), the same edit requests and regression prompts,
compared side by side: did the edits take, did the rest stay, and what does each arm cost in latency.

An arm is `URL[:MODEL]`: two servers with different patch sets, or one server with variants
(`memit-vllm serve M --memit-variant NAME=P`), where MODEL picks the variant. Everything goes through
the OpenAI API; the edit metrics are `memit-vllm eval`'s (same scorer, same definitions).
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

from .core.files import atomic_file, check_report_outputs
from .core.records import read_dataset, read_prompts
from .errors import MemitError
from .evaluate.generation import NEW_TOKENS
from .evaluate.metrics import COUNTERFACT_METRICS, GENERATION_METRICS, ZSRE_METRICS
from .options import unrelated_count_option, zsre_target_option

GENERATE_TOKENS = 16
LATENCY_CONCURRENCY = 4  # parallel single-prompt requests while latency is measured


@dataclass
class Arm:
    label: str
    url: str
    model: str | None

    @property
    def name(self) -> str:
        return f"{self.url}:{self.model}" if self.model else self.url


def parse_arm(label: str, spec: str) -> Arm:
    """`http://host:port[:MODEL]`: a trailing `:X` is a model unless X is a port number."""
    from .evaluate.served import split_endpoint

    return Arm(label, *split_endpoint(f"--{label.lower()}", spec))


def _tokenizer_for(arm: Arm, tokenizer: str | None):
    """The tokenizer of the arm's base model: --tokenizer, else the server's root model if it is a local dir."""
    from transformers import AutoTokenizer

    from .evaluate.served import request_json

    if tokenizer is None:
        models = {m["id"]: m for m in request_json(arm.url, "/v1/models")["data"]}
        model = models.get(arm.model) if arm.model else next(iter(models.values()))
        if model is None:
            raise MemitError(f"{arm.url} serves no model {arm.model!r}; it serves {sorted(models)}")
        tokenizer = model.get("root") or model["id"]
        if not Path(tokenizer).is_dir():
            tokenizer = model.get("parent") or tokenizer
        if not Path(tokenizer).is_dir():
            raise MemitError(f"cannot find the tokenizer of {arm.name} (model {tokenizer!r} is not a local dir): "
                             "pass --tokenizer DIR")
    return AutoTokenizer.from_pretrained(tokenizer)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"p50_ms": q[49], "p90_ms": q[89], "p99_ms": q[98], "mean_ms": statistics.fmean(ms), "requests": len(ms)}


def _timed_completions(scorer, prompts: list[str]) -> tuple[list[str], list[float]]:
    """Greedy continuations, one request per prompt (so each has its own latency), a few at a time."""
    def one(prompt: str) -> tuple[str, float]:
        start = time.perf_counter()
        (text,) = scorer.complete([prompt], GENERATE_TOKENS)
        return text, time.perf_counter() - start

    with ThreadPoolExecutor(LATENCY_CONCURRENCY) as pool:
        results = list(pool.map(one, prompts))
    return [t for t, _ in results], [s for _, s in results]


def _hit(completion: str, target: str) -> bool:
    return completion.strip().startswith(target.strip())


def run_arm(arm: Arm, records: list, fmt: str, regression: list[dict], tokenizer, batch_size: int, task) -> dict:
    """The arm's teacher-forced scores, its completions of the `task`'s prompts (`generated`, with its
    `scorer`: internal, dropped from the result) and its latency on the rewrite, paraphrase and regression
    prompts."""
    from .evaluate.run import measure_counterfact, measure_zsre
    from .evaluate.served import ServedScorer

    scorer = ServedScorer(arm.url, tokenizer, batch_size=batch_size, model=arm.model)
    metrics = measure_zsre(scorer, records) if fmt == "zsre" else measure_counterfact(scorer, records)
    texts, seconds = _timed_completions(scorer, task.hit_prompts + [x["prompt"] for x in regression])
    return {"arm": arm.name, "url": arm.url, "model": scorer.model, "patches": scorer.served_patch_ids(),
            "metrics": metrics, "latency": _percentiles(seconds), "regression_answers": texts[len(task.hit_prompts):],
            "generated": task.complete(scorer), "scorer": scorer}


def _agreement(answers: list[str], prompts: list[dict], control: list[str]) -> float:
    """An item's own answer must start the completion; without one, the completion must equal arm A's."""
    same = [_hit(a, x["answer"]) if x["answer"] is not None else a.strip() == c.strip()
            for a, x, c in zip(answers, prompts, control)]
    return sum(same) / len(same)


def compare(a: Arm, b: Arm, edits: str, regression: str | None = None, n: int | None = None,
            tokenizer: str | None = None, batch_size: int = 16, new_tokens: int = NEW_TOKENS,
            unrelated: str | None = None, heldout: str | None = None, zsre_target: str = "answers",
            unrelated_count: int | None = None) -> dict:
    """Both arms on the same data; regression answers are compared with each item's "answer", or with
    arm A's answer where an item has none (A is the control arm). The generated metrics are `eval
    --generate`'s with A as the unedited model: what B kept of A's completions, KL(A || B)."""
    from .evaluate.generation import generation_task, served_kl, unrelated_prompts

    fmt, records = read_dataset(edits, n, zsre_target=zsre_target)
    prompts = read_prompts(regression, "--regression") if regression else []
    # Only the later records' questions: read with the default target (the alt of some zsRE records is empty).
    others, source = unrelated_prompts(edits, fmt, records, unrelated=unrelated, count=unrelated_count)
    tok = _tokenizer_for(a, tokenizer)
    task = generation_task(tok, fmt, records, others, source, heldout, new_tokens=new_tokens)
    arms = [run_arm(arm, records, fmt, prompts, tok, batch_size, task) for arm in (a, b)]
    control = arms[0]["generated"]
    task.info["unrelated_confident"] = task.confident(control)
    kl = {"heldout_kl_top20": served_kl(arms[0]["scorer"], arms[1]["scorer"], task.heldout)} if task.heldout else {}
    for arm, arm_kl in zip(arms, (dict.fromkeys(kl, 0.0), kl)):  # KL(A || A) = 0
        arm["metrics"] |= task.metrics(arm.pop("generated"), control) | arm_kl
        del arm["scorer"]
        if prompts:
            arm["metrics"]["regression_agreement"] = _agreement(arm["regression_answers"], prompts,
                                                                arms[0]["regression_answers"])
    known = {**(ZSRE_METRICS if fmt == "zsre" else COUNTERFACT_METRICS), **GENERATION_METRICS}
    meanings = {k: v for k, v in known.items() if k in arms[0]["metrics"]}
    if prompts:
        meanings["regression_agreement"] = "regression prompts answered as expected (given answer, else as A)"
    return {"edits": str(Path(edits).resolve()), "format": fmt, "n": len(records),
            **({"zsre_target": zsre_target} if fmt == "zsre" else {}),
            "regression": str(Path(regression).resolve()) if regression else None,
            "regression_prompts": len(prompts), "generation": task.info, "metrics": meanings, "A": arms[0],
            "B": arms[1], "delta": {k: arms[1]["metrics"][k] - arms[0]["metrics"][k] for k in meanings}}


def format_table(result: dict) -> str:
    from .evaluate.report import generation_note, value_text

    a, b = result["A"], result["B"]
    width = max(map(len, [*result["metrics"], "latency p99 (ms)"]))
    lines = [f"A = {a['arm']} (patches: {', '.join(a['patches']) or 'none'})",
             f"B = {b['arm']} (patches: {', '.join(b['patches']) or 'none'})",
             f"{Path(result['edits']).name}: {result['n']} edits ({result['format']}); "
             f"{result['regression_prompts']} regression prompts",
             f"{'metric':<{width}}  {'A':>9}  {'B':>9}  {'B - A':>9}"]
    for k, meaning in result["metrics"].items():
        lines.append(f"{k:<{width}}  {value_text(k, a['metrics'][k], False)}  {value_text(k, b['metrics'][k], False)}  "
                     f"{value_text(k, result['delta'][k], True)}   {meaning}")
    for q in ("p50", "p90", "p99"):
        key = f"{q}_ms"
        lines.append(f"{f'latency {q} (ms)':<{width}}  {a['latency'][key]:>9.1f}  {b['latency'][key]:>9.1f}  "
                     f"{b['latency'][key] - a['latency'][key]:>+9.1f}")
    return "\n".join([*lines, generation_note(result["generation"])])


def plot(result: dict, path: str | Path) -> Path:
    from .evaluate.report import bar_chart

    scores = [k for k in result["metrics"] if not k.endswith("_magnitude") and not k.startswith("heldout_kl")]
    kls = [k for k in result["metrics"] if k.startswith("heldout_kl")]
    series = {"A": result["A"]["metrics"], "B": result["B"]["metrics"]}
    latency = {label: {f"{q} ms": result[label]["latency"][f"{q}_ms"] for q in ("p50", "p90", "p99")}
               for label in ("A", "B")}
    title = f"A = {result['A']['arm']}   B = {result['B']['arm']}   ({result['n']} edits)"
    panels = [(scores, series, (0, 1.08)), *([(kls, series, None)] if kls else []),
              (["p50 ms", "p90 ms", "p99 ms"], latency, None)]
    return bar_chart(panels, title, path)


@click.command("ab")
@click.option("--a", "arm_a", required=True, metavar="URL[:MODEL]", help="Arm A (the control), e.g. "
              "http://127.0.0.1:8000 or http://127.0.0.1:8000:base.")
@click.option("--b", "arm_b", required=True, metavar="URL[:MODEL]", help="Arm B, e.g. http://127.0.0.1:8000:edited.")
@click.option("--edits", required=True, help="Edit requests: CounterFact (full or EasyEdit layout) or zsRE JSON.")
@click.option("--regression", default=None, help="Prompts (JSON list / JSONL of strings or {prompt, answer}) whose "
              "answers should not change; without an answer, arm A's answer is the reference.")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Use the first N edit records.")
@zsre_target_option
@click.option("--tokenizer", default=None, help="Tokenizer dir (default: the served base model's dir).")
@click.option("--json", "json_out", default="ab.json", show_default=True, metavar="PATH",
              help="Write the full result here ('-': print it instead of the table).")
@click.option("--plot", "plot_out", default="ab.png", show_default=True, metavar="PNG", help="Chart of A vs B.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=NEW_TOKENS, show_default=True,
              help="Greedy tokens per completion of the generated metrics (as `eval --generate`).")
@click.option("--unrelated", default=None, metavar="FILE", help="Prompts no edit concerns (as `eval --unrelated`; "
              "default: the edit prompts of the records after the first N).")
@unrelated_count_option
@click.option("--heldout", default=None, metavar="FILE", help="Text for the KL between the arms (as `eval --heldout`).")
def ab_command(arm_a, arm_b, edits, regression, n, zsre_target, tokenizer, json_out, plot_out, batch_size, new_tokens,
               unrelated, unrelated_count, heldout):
    """Compare two served arms on edit success, regressions and latency (table, JSON, PNG)."""
    a, b = parse_arm("A", arm_a), parse_arm("B", arm_b)
    # checked before the servers are asked, not after
    check_report_outputs({"--json": json_out, "--plot": plot_out}, (edits, regression, unrelated, heldout))
    result = compare(a, b, edits, regression, n=n, tokenizer=tokenizer, batch_size=batch_size,
                     new_tokens=new_tokens, unrelated=unrelated, heldout=heldout, zsre_target=zsre_target,
                     unrelated_count=unrelated_count)
    if not result["regression_prompts"]:
        for arm in ("A", "B"):
            del result[arm]["regression_answers"]
    plot(result, plot_out)
    if json_out == "-":
        return click.echo(json.dumps(result, indent=2))
    with atomic_file(json_out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(format_table(result))
    click.echo(f"wrote {json_out} and {plot_out}", err=True)

