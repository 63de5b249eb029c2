"""The core bench's baseline: the adaptive frontier against the static one.

Both frontiers are read the same way: for each test accuracy, the fewest mean MACs per sample
that reach it.

- **static** (:mod:`dynray.bench.static`): plain CNNs of a small sweep, each net's accuracy the
  mean over its seeds; a net is on the frontier when no cheaper net is as accurate.
- **adaptive**: the served model's threshold rules, each calibrated on *val* (the production
  rule's confidence measure, β and γ) to a grid of MAC budgets and accuracy-drop targets, then
  measured on test. A rule is on the frontier when no cheaper rule is as accurate on test.

Between two frontier points the MACs are interpolated linearly (mixing the two nets or rules
at random reaches every point on that line). ``frontier`` compares the two at accuracies
from ``lowest`` (0.975) up to the calibrated operating point's.
"""

from __future__ import annotations

import logging

import numpy as np

from dynray.bench.static import macs_at_accuracy, pareto, static_frontier
from dynray.errors import CalibrationError
from dynray.evaluation import ExitRecords, simulate
from dynray.thresholds import CalibrationTarget, ThresholdRule, calibrate

__all__ = ["adaptive_frontier", "compare_frontiers"]
log = logging.getLogger(__name__)


def adaptive_frontier(val: ExitRecords, test: ExitRecords, rule: ThresholdRule, *, budgets: int = 48,
                      max_drops: tuple[float, ...] = (0.0, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03)) -> list[dict]:
    """Rules of ``rule``'s family calibrated on ``val`` at ``budgets`` MAC budgets (log-spaced
    from the first exit to the full network) and at ``max_drops``; each measured on ``test``."""
    family = {"confidences": (rule.confidence,), "complexity_weights": (rule.complexity_weight,),
              "agreement_bonuses": (rule.agreement_bonus,), "feature_weights": rule.feature_weights}
    lo, hi = float(val.cum_macs[0]), float(val.cum_macs[-1])
    targets = [CalibrationTarget(macs_budget=float(b)) for b in np.geomspace(lo * 1.0001, hi, budgets)]
    targets += [CalibrationTarget(max_drop=d) for d in max_drops]
    points = []
    for t in targets:
        try:
            found = calibrate(val, t, **family).rule
        except CalibrationError as e:  # a target this family cannot meet on val: no point
            log.debug("no rule for %s: %s", t, e)
            continue
        o = simulate(test, found)
        points.append({"accuracy": o.accuracy, "macs": o.mean_macs, "target": {k: v for k, v in vars(t).items() if v is not None}})
    return pareto(points)


def compare_frontiers(static_rows: list[dict], adaptive: list[dict], accuracy: float, macs: float, *, lowest: float = 0.975, step: float = 0.001) -> dict:
    """The core section's baseline fields for an operating point of ``accuracy`` at ``macs``."""
    static = static_frontier(static_rows)
    at_point = macs_at_accuracy(static, accuracy)
    grid = [round(a, 6) for a in np.arange(lowest, accuracy + 1e-9, step)] if accuracy >= lowest else []
    if grid and accuracy - grid[-1] > 1e-9:
        grid.append(accuracy)
    rows = []
    for a in grid:
        s, d = macs_at_accuracy(static, a), macs_at_accuracy(adaptive, a)
        rows.append({"accuracy": a, "macs_static": s, "macs_adaptive": d, "ratio": d / s if s and d is not None else None})
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    return {
        "macs_static_equal_accuracy": at_point,
        "static_equal_accuracy_ratio": at_point / macs if at_point is not None else None,
        "static_max_accuracy": max((n["accuracy"] for n in static), default=None),
        "frontier": rows,
        "frontier_worst_ratio": max(ratios) if len(ratios) == len(rows) and rows else None,
        "frontier_static": static,
        "frontier_adaptive": adaptive,
        "static_sweep": static_rows,
    }
