"""Thresholds tuned for an operating point: the baseline a learned router must beat.

For cost weights λ, :func:`tune_thresholds` picks the threshold rule that maximises the mean
reward ``correct - λ_cost·cost - λ_lat·latency - λ_macs·MMACs`` on validation outputs, over
every confidence measure and agreement bonus, by coordinate descent on score quantiles. This
is "thresholds re-calibrated separately for each λ" in the router benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dynray.evaluation import ExitRecords
from dynray.routing.costs import RouteCosts, TierLoad
from dynray.routing.features import CostWeights
from dynray.thresholds import ThresholdRule

__all__ = ["ExitPrices", "exit_prices", "tune_thresholds"]
_NEVER = 2.0


@dataclass(frozen=True)
class ExitPrices:
    """Cost, latency and MACs of leaving at each exit on the thresholds path (edge, then cloud)."""

    cost: np.ndarray  # [K]
    latency_ms: np.ndarray  # [K]
    macs: np.ndarray  # [K]

    def penalty(self, w: CostWeights) -> np.ndarray:
        return w.cost * self.cost + w.lat * self.latency_ms + w.macs * self.macs / 1e6


def exit_prices(costs: RouteCosts, edge: TierLoad = TierLoad(), cloud: TierLoad = TierLoad()) -> ExitPrices:
    conds = {"edge": edge, "cloud": cloud}
    cost, lat, macs = [], [], []
    c = lt = m = 0.0
    tier = None
    for k in range(costs.num_exits):
        nxt = "edge" if k < costs.edge_stages else "cloud"
        s = costs.run(k, nxt, conds[nxt], new_call=nxt != tier)
        tier = nxt
        c, lt, m = c + s.cost, lt + s.latency_ms, m + s.macs
        cost.append(c)
        lat.append(lt)
        macs.append(m)
    return ExitPrices(np.array(cost), np.array(lat), np.array(macs))


def _scores(rec: ExitRecords, rule: ThresholdRule) -> np.ndarray:
    return torch.stack([rule.score(k, rec.logits[k], rec.complexity, rec.prev_pred(k)) for k in range(rec.num_exits - 1)]).double().numpy()


def tune_thresholds(
    rec: ExitRecords,
    prices: ExitPrices,
    weights: CostWeights,
    *,
    confidences: Sequence[str] = ("max_softmax", "margin", "entropy"),
    agreement_bonuses: Sequence[float] = (0.0, 0.1),
    levels: int = 100,
    sweeps: int = 3,
) -> ThresholdRule:
    """The threshold rule with the best mean reward on ``rec`` at ``weights``."""
    correct = rec.correct.numpy()  # [K, N]
    value = correct - prices.penalty(weights)[:, None]  # [K, N] reward of leaving at exit k
    n, kd = correct.shape[1], rec.num_exits - 1
    cols = np.arange(n)
    best: tuple[float, ThresholdRule] | None = None
    for conf in confidences:
        for gamma in agreement_bonuses if rec.num_exits > 2 else (0.0,):
            rule = ThresholdRule(thresholds=(0.0,) * kd, confidence=conf, agreement_bonus=gamma)
            s = _scores(rec, rule)  # [K-1, N]
            grids = [np.unique(np.append(np.quantile(s[k], np.linspace(0, 1, levels)), _NEVER)) for k in range(kd)]
            taus = [g[-1] for g in grids]

            def mean_reward(t: list[float]) -> float:
                stop = np.vstack([s >= np.asarray(t)[:, None], np.ones((1, n), dtype=bool)])
                return float(value[stop.argmax(axis=0), cols].mean())

            cur = mean_reward(taus)
            for _ in range(sweeps):
                for k in range(kd):
                    for tau in grids[k]:
                        trial = list(taus)
                        trial[k] = tau
                        r = mean_reward(trial)
                        if r > cur + 1e-12:
                            cur, taus = r, trial
            if best is None or cur > best[0]:
                best = (cur, ThresholdRule(thresholds=tuple(float(t) for t in taus), confidence=conf, agreement_bonus=gamma))
    assert best is not None
    return best[1]
