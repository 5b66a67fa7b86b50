"""Latency vs offered load from a ramp's steps, as a PNG (matplotlib: the optional ``bench`` extra)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    pass


def require_matplotlib() -> None:
    """Fail before a long ramp rather than after it when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'streamhub[bench]' "
                              "(or pip install matplotlib)") from None


def median_run(aggregated: dict[str, Any]) -> dict[str, Any]:
    """The run whose best sustained rate is the median one (the first of two middles)."""
    runs = sorted(aggregated["runs"], key=lambda r: r.get("best_sustained_deliveries_per_s") or 0)
    return runs[(len(runs) - 1) // 2] if runs else {}


def plot_ramp(aggregated: dict[str, Any], path: Path) -> None:
    """p50 and p99 latency (log scale) against offered deliveries/s (rate x members) for each step of the
    median run; failed steps are marked, the p99 limit drawn."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    run = median_run(aggregated)
    steps = run.get("steps") or []
    if not steps:
        raise PlotUnavailable("the ramp has no step to plot")
    params = run.get("params", {})
    subs = params.get("subs", 1)
    offered = [step["rate"] * subs for step in steps]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for key, label, style in (("p50_ms", "p50", "o-"), ("p99_ms", "p99", "s-")):
        ax.plot(offered, [step[key] for step in steps], style, label=f"{label} latency")
    failed = [(o, s["p99_ms"]) for o, s in zip(offered, steps, strict=True) if not s["pass"]]
    if failed:
        ax.plot(*zip(*failed, strict=True), "rx", markersize=12, label="failed step")
    limit = params.get("p99_limit_ms")
    if limit:
        ax.axhline(limit, color="grey", linestyle="--", linewidth=1, label=f"p99 limit {limit:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(offered)  # one tick per step, plain numbers (10,000, not 10^4)
    ax.tick_params(axis="x", labelrotation=45)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:,.10g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"offered load: deliveries/s (publish rate x {subs} members)")
    ax.set_ylabel("latency, ms (send -> receive)")
    cpu = [s.get("deliveries_per_server_cpu_s") for s in steps if s["pass"] and s.get("deliveries_per_server_cpu_s")]
    efficiency = f"; median {statistics.median(cpu):,.0f} deliveries per server CPU-s" if cpu else ""
    ax.set_title(f"hubctl bench {aggregated.get('scenario', 'ramp')}: one room of {subs} members, a step every "
                 f"{params.get('step_s', '?')} s\nbest sustained {run.get('best_sustained_deliveries_per_s', 0):,.0f}"
                 f" deliveries/s{efficiency}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
