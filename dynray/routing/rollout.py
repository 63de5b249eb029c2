"""Batched, exact replay of a router over cached exit outputs.

``rollout`` walks every sample of an :class:`~dynray.evaluation.ExitRecords` through the
edge/cloud topology at once, asking a decision function for an action at each exit, and
prices each path with :class:`~dynray.routing.costs.RouteCosts`. It is the vectorised twin of
stepping :class:`~dynray.routing.env.RoutingEnv` one sample at a time (a test checks that they
agree), and the benchmark's curves and the load-shift trace are built on it.

Shape legend: N samples, K exits, C classes, D observation size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dynray.evaluation import ExitRecords
from dynray.routing.costs import RouteCosts, TierLoad
from dynray.routing.features import CONTINUE, OFFLOAD, STOP, CostWeights, Load, build_observation

__all__ = ["Decide", "Paths", "rollout", "threshold_decide", "observed_load"]

# obs [n, D], exit k, logits [n, C] -> actions [n] int64 (STOP / CONTINUE / OFFLOAD)
Decide = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Paths:
    """Where every sample left, and what its path cost."""

    exit_index: torch.Tensor  # [N] int64
    tier: torch.Tensor  # [N] bool: answered on the cloud
    correct: torch.Tensor  # [N] bool
    cost: torch.Tensor  # [N] cost units
    latency_ms: torch.Tensor  # [N]
    macs: torch.Tensor  # [N]
    offloaded: torch.Tensor  # [N] bool: an offload action moved the sample before the edge's last stage

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean())

    def reward(self, w: CostWeights) -> torch.Tensor:
        return self.correct.double() - w.cost * self.cost - w.lat * self.latency_ms - w.macs * self.macs / 1e6


def observed_load(costs: RouteCosts, edge: TierLoad, cloud: TierLoad) -> Load:
    """What the ingress reports for these tier conditions (queue and call-time EWMA)."""
    return Load(edge_queue=edge.queue, edge_ms=costs.observed_call_ms("edge", edge), cloud_queue=cloud.queue, cloud_ms=costs.observed_call_ms("cloud", cloud))


def threshold_decide(rule) -> Decide:
    """A :class:`~dynray.thresholds.ThresholdRule` as a decision function (never offloads)."""

    def decide(obs: torch.Tensor, k: int, logits: torch.Tensor, complexity: torch.Tensor | None = None, prev_pred: torch.Tensor | None = None) -> torch.Tensor:
        stop = rule.stop(k, logits, complexity if complexity is not None else logits.new_zeros(logits.shape[0], 0), prev_pred)
        return torch.where(stop, STOP, CONTINUE)

    decide.needs_context = True  # type: ignore[attr-defined]
    return decide


@torch.no_grad()
def rollout(
    rec: ExitRecords,
    costs: RouteCosts,
    decide: Decide,
    weights: CostWeights,
    *,
    edge: TierLoad = TierLoad(),
    cloud: TierLoad = TierLoad(),
    load: Load | None = None,
    index: torch.Tensor | None = None,
) -> Paths:
    """Route the samples ``index`` (default: all) of ``rec`` and price their paths.

    ``edge``/``cloud`` are the true tier conditions that set latencies; ``load`` is what the
    router observes (default: exactly those conditions).
    """
    idx = torch.arange(rec.labels.shape[0]) if index is None else index
    n, k_last = idx.shape[0], rec.num_exits - 1
    seen = load if load is not None else observed_load(costs, edge, cloud)
    conds = {"edge": edge, "cloud": cloud}
    exit_index = torch.full((n,), k_last, dtype=torch.int64)
    on_cloud = torch.zeros(n, dtype=torch.bool)
    offloaded = torch.zeros(n, dtype=torch.bool)
    cost, lat, macs = (torch.zeros(n, dtype=torch.float64) for _ in range(3))

    def charge(rows: torch.Tensor, k: int, tier: str, new_call: bool) -> None:
        s = costs.run(k, tier, conds[tier], new_call=new_call)
        cost[rows] += s.cost
        lat[rows] += s.latency_ms
        macs[rows] += s.macs

    live = torch.arange(n)  # rows still running
    charge(live, 0, "edge", True)
    for k in range(k_last):
        if not live.numel():
            break
        s_idx = idx[live]
        logits = rec.logits[k, s_idx]
        prev = rec.logits[k - 1, s_idx].argmax(dim=1) if k > 0 else None
        cx = rec.complexity[s_idx]
        obs = build_observation(k, rec.num_exits, logits, cx, prev, on_cloud[live], seen, weights, rec.logits[k - 1, s_idx] if k > 0 else None)
        act = decide(obs, k, logits, cx, prev) if getattr(decide, "needs_context", False) else decide(obs, k, logits)
        stop = act == STOP
        exit_index[live[stop]] = k
        go = live[~stop]
        go_act = act[~stop]
        for tier in ("edge", "cloud"):
            cur_cloud = on_cloud[go]
            nxt_cloud = cur_cloud | (go_act == OFFLOAD) | (k + 1 >= costs.edge_stages)
            rows = go[nxt_cloud] if tier == "cloud" else go[~nxt_cloud]
            if not rows.numel():
                continue
            hop = ~on_cloud[rows] if tier == "cloud" else torch.zeros(rows.shape[0], dtype=torch.bool)
            if hop.any():
                charge(rows[hop], k + 1, tier, True)
            if (~hop).any():
                charge(rows[~hop], k + 1, tier, False)
            if tier == "cloud":
                offloaded[rows[hop & (k + 1 < costs.edge_stages)]] = True
                on_cloud[rows] = True
        live = go
    correct = rec.correct[exit_index, idx]
    return Paths(exit_index=exit_index, tier=on_cloud, correct=correct, cost=cost, latency_ms=lat, macs=macs, offloaded=offloaded)
