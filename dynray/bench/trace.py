"""The load-shift scenario: a request trace where the cloud tier slows down for a window.

Requests arrive at a fixed rate, each one a sample of the split. During the window the cloud
tier's round trip and compute are ``slowdown`` times slower. A router sees the load the way
the ingress does: an EWMA of each tier's observed call time, updated when a call it made
completes and by a health probe every ``probe_s`` (so a router that stops calling a slow tier
still notices when it recovers). A request misses the latency SLO when its path takes longer
than ``slo_ms``. Every request is priced exactly with :func:`~dynray.routing.rollout.rollout`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords
from dynray.routing.costs import RouteCosts, TierLoad
from dynray.routing.features import CostWeights, Load
from dynray.routing.rollout import Decide, Paths, rollout

__all__ = ["LoadShift", "TraceResult", "run_trace"]


@dataclass(frozen=True, kw_only=True)
class LoadShift:
    """The scenario: trace length and rate, the slow window, the SLO and the observation model."""

    requests: int = 4000
    rate_per_s: float = 50.0
    window: tuple[float, float] = (0.3, 0.7)
    """Fraction of the trace during which the cloud tier is slow."""
    slowdown: float = 5.0
    """Cloud latency factor inside the window (the issue's "cloud latency x5")."""
    slo_ms: float = 100.0
    """Latency SLO per request."""
    probe_s: float = 0.5
    """Health-probe period that refreshes each tier's call-time EWMA."""
    ewma_alpha: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.window
        if not (0 <= lo < hi <= 1) or self.requests < 1 or self.rate_per_s <= 0 or self.slowdown < 1 or self.slo_ms <= 0 or self.probe_s <= 0 or not 0 < self.ewma_alpha <= 1:
            raise ConfigError("bad load-shift scenario", got=self, fix="0 <= window[0] < window[1] <= 1, requests >= 1, rate > 0, slowdown >= 1, slo_ms > 0, probe_s > 0, 0 < ewma_alpha <= 1")


@dataclass(frozen=True)
class TraceResult:
    accuracy: float
    slo_misses: int
    slo_misses_in_window: int
    mean_cost: float
    p99_ms: float
    escalated_frac: float
    escalated_in_window: int
    rewards: np.ndarray = field(repr=False, compare=False)
    """[requests] reward each request earned at the trace's cost weights (not in to_dict)."""

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "rewards"}


class _Ewma:
    def __init__(self, v: float, a: float) -> None:
        self.v, self.a = v, a

    def add(self, x: float) -> None:
        self.v += self.a * (x - self.v)


def run_trace(
    rec: ExitRecords,
    costs: RouteCosts,
    decide: Decide,
    weights: CostWeights,
    shift: LoadShift,
    *,
    feedback: Callable[[int, CostWeights, TierLoad, TierLoad, Load, Paths], None] | None = None,
) -> TraceResult:
    """Replay the scenario with one router. ``feedback(sample, w, edge, cloud, seen, paths)``
    is called after each request (the hybrid router adapts from it)."""
    rng = np.random.default_rng(shift.seed)
    n = rec.labels.shape[0]
    order = np.concatenate([rng.permutation(n) for _ in range(shift.requests // n + 1)])[: shift.requests]
    t_lo, t_hi = (shift.window[0] * shift.requests / shift.rate_per_s, shift.window[1] * shift.requests / shift.rate_per_s)
    nominal = {"edge": costs.observed_call_ms("edge", TierLoad()), "cloud": costs.observed_call_ms("cloud", TierLoad())}
    ewma = {t: _Ewma(v, shift.ewma_alpha) for t, v in nominal.items()}
    pending: list[tuple[float, str, float]] = []  # (time the observation arrives, tier, call ms)
    next_probe = 0.0
    edge = TierLoad()
    correct = np.zeros(shift.requests, dtype=bool)
    lat = np.zeros(shift.requests)
    cost = np.zeros(shift.requests)
    cloud_used = np.zeros(shift.requests, dtype=bool)
    reward = np.zeros(shift.requests)
    in_win = np.zeros(shift.requests, dtype=bool)
    for i, s in enumerate(order):
        t = i / shift.rate_per_s
        in_win[i] = t_lo <= t < t_hi
        cloud = TierLoad(slowdown=shift.slowdown if in_win[i] else 1.0)
        while next_probe <= t:
            f = shift.slowdown if t_lo <= next_probe < t_hi else 1.0
            for tier in ("edge", "cloud"):
                ms = costs.observed_call_ms(tier, TierLoad(slowdown=f) if tier == "cloud" else edge)
                heapq.heappush(pending, (next_probe + ms / 1000, tier, ms))
            next_probe += shift.probe_s
        while pending and pending[0][0] <= t:
            _, tier, ms = heapq.heappop(pending)
            ewma[tier].add(ms)
        seen = Load(edge_ms=ewma["edge"].v, cloud_ms=ewma["cloud"].v)
        p = rollout(rec, costs, decide, weights, edge=edge, cloud=cloud, load=seen, index=torch.tensor([int(s)]))
        correct[i], lat[i], cost[i], cloud_used[i] = bool(p.correct[0]), float(p.latency_ms[0]), float(p.cost[0]), bool(p.tier[0])
        reward[i] = float(p.reward(weights)[0])
        heapq.heappush(pending, (t + lat[i] / 1000, "edge", costs.observed_call_ms("edge", edge)))
        if cloud_used[i]:
            heapq.heappush(pending, (t + lat[i] / 1000, "cloud", costs.observed_call_ms("cloud", cloud)))
        if feedback is not None:
            feedback(int(s), weights, edge, cloud, seen, p)
    miss = lat > shift.slo_ms
    return TraceResult(
        accuracy=float(correct.mean()),
        slo_misses=int(miss.sum()),
        slo_misses_in_window=int((miss & in_win).sum()),
        mean_cost=float(cost.mean()),
        p99_ms=float(np.quantile(lat, 0.99)),
        escalated_frac=float(cloud_used.mean()),
        escalated_in_window=int((cloud_used & in_win).sum()),
        rewards=reward,
    )
