"""Plots for the benchmark READMEs (matplotlib is imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install matplotlib") from None
    return plt


def latency_histogram(series: dict[str, list[float]], path: Path, title: str) -> None:
    """Overlaid latency distributions (e.g. cold vs warm), in ms."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.5))
    top = max(max(values) for values in series.values() if values)
    bins = [top * i / 30 for i in range(31)]
    for label, values in series.items():
        axes.hist(values, bins=bins, alpha=0.6, label=f"{label} (n={len(values)})")
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("requests")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def exact_match_by_steps(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Exact-match rate and task count per number of denoising steps."""
    plt = _pyplot()
    by_steps: dict[int, list[bool]] = {}
    for row in rows:
        if "steps" in row:
            by_steps.setdefault(int(row["steps"]), []).append(bool(row["exact_match"]))
    steps = sorted(by_steps)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.bar(steps, [sum(v) / len(v) for v in (by_steps[s] for s in steps)], color="tab:blue")
    for step in steps:
        axes.annotate(str(len(by_steps[step])), (step, 0), ha="center", va="bottom", fontsize=7)
    axes.set_xlabel("denoising steps (labels: tasks)")
    axes.set_ylabel("exact match")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
