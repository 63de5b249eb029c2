"""Accuracy-versus-cost curves and equal-accuracy comparisons between routers.

A curve is a list of ``{"accuracy", "cost"}`` points. The thresholds baseline is compared on
its Pareto frontier (the cheapest cost reached at each accuracy), linearly interpolated
between frontier points: mixing two rules at random reaches every point on the segment, so
the interpolated cost is achievable by thresholds too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Point", "frontier", "cost_at", "Comparison", "compare"]

Point = dict  # {"accuracy": float, "cost": float, ...}


def frontier(points: list[Point]) -> list[Point]:
    """Points no other point beats on both accuracy (higher) and cost (lower), by accuracy."""
    pts = sorted(points, key=lambda p: (p["cost"], -p["accuracy"]))
    out: list[Point] = []
    best = -np.inf
    for p in pts:
        if p["accuracy"] > best + 1e-12:
            out.append(p)
            best = p["accuracy"]
    return out


def cost_at(front: list[Point], accuracy: float) -> tuple[float, str]:
    """Frontier cost at ``accuracy`` and where it came from: "interpolated", "below" or "above" the range."""
    acc = np.array([p["accuracy"] for p in front])
    cost = np.array([p["cost"] for p in front])
    if accuracy > acc[-1] + 1e-12:
        return float(cost[-1]), "above"
    if accuracy < acc[0] - 1e-12:
        return float(cost[0]), "below"
    return float(np.interp(accuracy, acc, cost)), "interpolated"


@dataclass(frozen=True)
class Comparison:
    accuracy: float
    cost: float
    thresholds_cost: float
    saving: float  # 1 - cost / thresholds_cost: > 0 cheaper than thresholds at that accuracy
    where: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compare(points: list[Point], thresholds: list[Point]) -> list[Comparison]:
    """Each router point against the thresholds frontier at the router's accuracy."""
    front = frontier(thresholds)
    out = []
    for p in points:
        c, where = cost_at(front, p["accuracy"])
        out.append(Comparison(p["accuracy"], p["cost"], c, 1.0 - p["cost"] / c if c > 0 else 0.0, where))
    return out
