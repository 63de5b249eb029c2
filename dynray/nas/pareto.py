"""Pareto fronts over (accuracy ↑, MACs ↓) and the front plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["dominates", "pareto_front", "pareto_ranks", "plot_front"]


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` = (accuracy, macs) dominates ``b``: no worse on both and better on one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, by increasing MACs."""
    idx = [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(idx, key=lambda i: (points[i][1], -points[i][0]))


def pareto_ranks(points: Sequence[tuple[float, float]]) -> list[int]:
    """Non-dominated sorting (NSGA-II): rank 0 is the front, rank 1 the front without it, …"""
    ranks = [-1] * len(points)
    left = set(range(len(points)))
    r = 0
    while left:
        layer = [i for i in left if not any(dominates(points[j], points[i]) for j in left if j != i)]
        for i in layer:
            ranks[i] = r
        left -= set(layer)
        r += 1
    return ranks


def plot_front(
    trials: Sequence[dict], front: Sequence[int], path: str | Path, *, reference: dict | None = None, title: str = "",
) -> Path:
    """Two panels, val (what the search optimised) and test (held out): every trial as a
    point, the front members (chosen on val) joined by a line, the reference as a star.

    ``trials`` rows need ``accuracy``, ``macs``, ``test_accuracy``, ``test_macs`` and
    ``status`` (completed / stopped); ``reference`` the same four metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, sharey=True)
    panels = (("accuracy", "macs", "val split (the search objective)"), ("test_accuracy", "test_macs", "test split (held out; same front members)"))
    for ax, (acc, macs, label) in zip(axes, panels, strict=True):
        for status, style in (("stopped", dict(c="0.7", marker="x", s=18, label="stopped early (ASHA or budget)")), ("completed", dict(c="tab:blue", marker="o", s=22, label="trained to the end"))):
            pts = [t for t in trials if t["status"] == status]
            if pts:
                ax.scatter([t[macs] / 1e3 for t in pts], [100 * t[acc] for t in pts], **style)
        fr = sorted((trials[i] for i in front), key=lambda t: t[macs])
        if fr:
            ax.plot([t[macs] / 1e3 for t in fr], [100 * t[acc] for t in fr], "-o", c="tab:red", ms=5, label="Pareto front (chosen on val)")
        if reference is not None:
            ax.scatter([reference[macs] / 1e3], [100 * reference[acc]], marker="*", s=170, c="gold", edgecolors="k", zorder=5, label="foundation default (same protocol)")
        ax.set_xscale("log")
        ax.set_xlabel("adaptive MACs per sample (thousands, log scale)")
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("adaptive accuracy (%)")
    done = [t for t in trials if t["status"] == "completed"] or list(trials)
    accs = [100 * t[k] for t in done for k in ("accuracy", "test_accuracy")]
    if accs:
        axes[0].set_ylim(max(min(accs) - 1.0, 80.0), min(100.0, max(accs) + 0.3))
    axes[1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title + " (trials below the axis not shown)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
