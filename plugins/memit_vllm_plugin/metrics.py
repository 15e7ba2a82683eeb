"""Prometheus metrics of the patches a server serves, on vLLM's own `/metrics` (its default registry).

- `memit_active_patch_info{id,name,version,variant,position}` = 1 for each merged patch (variant "") and
  each `--memit-variant` (variant = its model name); replaced after every hot apply and revert.
- `memit_hot_swaps_total{action,outcome}`: action apply|revert, outcome applied|reverted|refused|failed.
- `memit_hot_swap_seconds{action}`: duration of each successful change, validation and reload included.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACTIVE = Gauge("memit_active_patch_info", "Patches being served (1 per patch); variant is empty for merged ones",
               ["id", "name", "version", "variant", "position"], multiprocess_mode="livemostrecent")
SWAPS = Counter("memit_hot_swaps", "Hot apply/revert requests by outcome", ["action", "outcome"])
SECONDS = Histogram("memit_hot_swap_seconds", "Duration of successful hot applies and reverts", ["action"],
                    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))


def show_active(stack: list[dict], variants: dict[str, dict]) -> None:
    """Replace the info series: `stack` and `variants` (model name -> patch) as describe() gives them."""
    ACTIVE.clear()
    for i, p in enumerate(stack):
        ACTIVE.labels(p["id"], p["name"], p["version"], "", str(i)).set(1)
    for variant, p in variants.items():
        ACTIVE.labels(p["id"], p["name"], p["version"], variant, "0").set(1)
