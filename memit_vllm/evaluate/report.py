"""The eval report: a terminal table, JSON, and a PNG bar chart of before vs after."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.files import atomic_file


def _title(result: dict) -> str:
    patches = ", ".join(f"{p['name'] or p['patch_id']} ({p['edits']} edits)" for p in result["patches"]) or "none"
    return (f"{result['model']} on {Path(result['data']).name} ({result['format']}, n={result['n']}, "
            f"{result['backend']}); patches: {patches}")


def sampling_error(n: int) -> float:
    """The widest 95% interval half-width, in points, of a share measured on n > 0 prompts (at p = 1/2)."""
    return 100 * 1.96 * 0.5 / n ** 0.5


def generation_note(info: dict) -> str:
    """Where the generated metrics' prompts and text came from, and whether the KL text is held out."""
    heldout, n = info["heldout"], info["unrelated_prompts"]
    lines = [f"generated: {info['new_tokens']} greedy tokens; {n} unrelated prompts ({info['unrelated']}), "
             f"{info.get('unrelated_confident', '?')} of them confident "
             f"(unedited p1 - p2 >= {info['confident_margin']})"
             + (f"; their shares are known to about +-{sampling_error(n):.0f} points (95%)" if n else "")]
    if heldout is None:
        lines.append("no held-out text (pass --heldout FILE): no KL")
    else:
        lines.append(f"KL on {heldout['positions']} positions of {heldout['texts']} texts, the {heldout['slice']} "
                     f"of {heldout['path']}")
        if heldout["covariance_overlap"]:
            lines.append("WARNING: a patch's covariance read these texts; they are not held out from it")
    return "\n".join(lines)


def value_text(name: str, value: float, signed: bool) -> str:
    """KLs are small: three significant digits in scientific notation; the rest four decimals."""
    spec = (">+9" if signed else ">9") + (".2e" if name.startswith("heldout_kl") else ".4f")
    return f"{value:{spec}}"


def format_table(result: dict) -> str:
    columns = [c for c in ("before", "after", "delta") if c in result]
    width = max(map(len, result["metrics"]))
    lines = [_title(result), f"{'metric':<{width}}  " + "  ".join(f"{c:>9}" for c in columns)]
    for name, meaning in result["metrics"].items():
        values = [value_text(name, result[c][name], c == "delta") for c in columns]
        lines.append(f"{name:<{width}}  " + "  ".join(values) + f"   {meaning}")
    if result.get("generation"):
        lines.append(generation_note(result["generation"]))
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict, path: str | Path) -> Path:
    """Grouped bars per metric; scores, magnitudes, GE and the KLs get their own panels (different scales)."""
    names = list(result["metrics"])
    series = {c: result[c] for c in ("before", "after") if c in result}
    own_panel = [lambda n: n.endswith("_magnitude"), lambda n: n == "GE", lambda n: n.startswith("heldout_kl")]
    panels = [([n for n in names if not any(f(n) for f in own_panel)], (0, 1.08)),
              *(([n for n in names if f(n)], None) for f in own_panel)]
    return bar_chart([(p, series, lim) for p, lim in panels if p], _title(result), path)


COLORS = ("#8c8c8c", "#1f77b4")


def bar_chart(panels: list[tuple[list[str], dict[str, dict], tuple | None]], title: str, path: str | Path) -> Path:
    """One panel per (metric names, {series label: {metric: value}}, y-limits or None), bars grouped by
    metric, series side by side; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [len(names) for names, _, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 + 1.3 * sum(widths), 4),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (names, series, ylim) in zip(axes[0], panels):
        bar = 0.8 / len(series)
        for k, (label, values) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * bar for i in range(len(names))]
            bars = ax.bar(xs, [values[n] for n in names], bar, label=label, color=COLORS[k % len(COLORS)])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        if ylim:
            ax.set_ylim(*ylim)
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # the temp name ends in .tmp: the format comes from the final name
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return Path(path)
