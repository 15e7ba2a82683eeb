"""The eval report: a terminal table, JSON, and a PNG bar chart of before vs after."""

from __future__ import annotations

import json
from pathlib import Path


def _title(result: dict) -> str:
    patches = ", ".join(f"{p['name'] or p['patch_id']} ({p['edits']} edits)" for p in result["patches"]) or "none"
    return (f"{result['model']} on {Path(result['data']).name} ({result['format']}, n={result['n']}, "
            f"{result['backend']}); patches: {patches}")


def format_table(result: dict) -> str:
    columns = [c for c in ("before", "after", "delta") if c in result]
    width = max(map(len, result["metrics"]))
    lines = [_title(result), f"{'metric':<{width}}  " + "  ".join(f"{c:>8}" for c in columns)]
    for name, meaning in result["metrics"].items():
        values = [f"{result[c][name]:>8.4f}" if c != "delta" else f"{result[c][name]:>+8.4f}" for c in columns]
        lines.append(f"{name:<{width}}  " + "  ".join(values) + f"   {meaning}")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict, path: str | Path) -> Path:
    """Grouped bars per metric; scores, magnitudes and GE get their own panels (different scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["metrics"])
    panels = [p for p in ([n for n in names if not n.endswith("_magnitude") and n != "GE"],
                          [n for n in names if n.endswith("_magnitude")], [n for n in names if n == "GE"]) if p]
    series = [(c, color) for c, color in (("before", "#8c8c8c"), ("after", "#1f77b4")) if c in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 + 1.3 * len(names), 4),
                             gridspec_kw={"width_ratios": [len(p) for p in panels]}, squeeze=False)
    bar = 0.8 / len(series)
    for ax, panel in zip(axes[0], panels):
        for k, (label, color) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * bar for i in range(len(panel))]
            bars = ax.bar(xs, [result[label][n] for n in panel], bar, label=label, color=color)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(panel)), [n.replace("_magnitude", "\nmagnitude") for n in panel], fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        if panel[0] in ("S", "efficacy"):
            ax.set_ylim(0, 1.08)
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle(_title(result), fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
