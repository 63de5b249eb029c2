"""The routers as stop rules inside a device, for the serving path (no RLlib).

A device evaluates exits, so it applies the router there. The ingress attaches a
:class:`RouteContext` to each device request: the router to use, the live load it sees and
the cost weights. :func:`make_rule` turns it into a ``StopRule`` for
:func:`dynray.serving.partition.run_stages`.

Serving executes ``offload`` as ``continue``: a device hands all its continuing samples on
at the end of its stage range, so an offload decided before the edge's last stage runs the
rest of the edge range first. At the edge's last stage (where escalation is decided with the
default ``edge_stages=2``) the two actions are the same. ``dynray bench router`` reports how
often the policy offloads early (``offloaded`` per curve point).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynray.errors import ConfigError
from dynray.routing.features import STOP, CostWeights, Load, build_observation
from dynray.routing.hybrid import HybridRouter
from dynray.routing.policy import PolicyNet
from dynray.thresholds import ThresholdRule

__all__ = ["ROUTERS", "RouteContext", "PolicyRule", "HybridRule", "make_rule"]

ROUTERS: tuple[str, ...] = ("thresholds", "ppo", "hybrid")


@dataclass(frozen=True)
class RouteContext:
    """What the ingress tells a device about routing one request."""

    router: str = "thresholds"
    load: Load = Load()
    weights: CostWeights = CostWeights()

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ConfigError("unknown router", got=self.router, fix=f"use one of {', '.join(ROUTERS)}")


class PolicyRule:
    """The exported PPO policy as a stop rule: stop where its greedy action is ``stop``."""

    uses_complexity = True

    def __init__(self, policy: PolicyNet, num_exits: int, on_cloud: bool, ctx: RouteContext) -> None:
        self.policy, self.num_exits, self.on_cloud, self.ctx = policy, num_exits, on_cloud, ctx
        self._prev: torch.Tensor | None = None  # logits of the samples that continued from the last exit

    def obs(self, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None) -> torch.Tensor:
        # run_stages asks exit by exit and drops the stopped samples in order, so the samples at
        # exit k are exactly those this rule let continue at exit k-1. A device that resumes
        # mid-network has no previous logits for its first exit (zeros, as at exit 0); with the
        # default split the cloud only runs the last exit, where nothing is decided.
        prev = self._prev if self._prev is not None and self._prev.shape[0] == logits.shape[0] and k > 0 else None
        return build_observation(k, self.num_exits, logits, complexity, prev_pred, self.on_cloud, self.ctx.load, self.ctx.weights, prev)

    def _remember(self, logits: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
        self._prev = logits[~stop]
        return stop

    def stop(self, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None = None) -> torch.Tensor:
        return self._remember(logits, self.policy.act(self.obs(k, logits, complexity, prev_pred))[0] == STOP)


class HybridRule(PolicyRule):
    """The hybrid router as a stop rule (policy when sure, thresholds otherwise)."""

    def __init__(self, hybrid: HybridRouter, num_exits: int, on_cloud: bool, ctx: RouteContext) -> None:
        super().__init__(hybrid.policy, num_exits, on_cloud, ctx)  # type: ignore[arg-type]
        self.hybrid = hybrid

    def stop(self, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None = None) -> torch.Tensor:
        obs = self.obs(k, logits, complexity, prev_pred) if self.hybrid.policy is not None else logits.new_zeros(logits.shape[0], 1)
        return self._remember(logits, self.hybrid.decide(obs, k, logits, complexity, prev_pred).actions == STOP)


def make_rule(ctx: RouteContext | None, thresholds: ThresholdRule, policy: PolicyNet | None, hybrid: HybridRouter | None, *, num_exits: int, on_cloud: bool):
    """The stop rule a device applies to one request group."""
    if ctx is None or ctx.router == "thresholds":
        return thresholds
    if ctx.router == "ppo":
        if policy is None:
            raise ConfigError("no PPO router is registered for this model version", fix="train one: dynray router train --model MODEL, or use router 'hybrid' or 'thresholds'")
        return PolicyRule(policy, num_exits, on_cloud, ctx)
    return HybridRule(hybrid or HybridRouter(policy, thresholds), num_exits, on_cloud, ctx)
