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

__all__ = ["ROUTERS", "RouteContext", "RouteTrace", "PolicyRule", "HybridRule", "make_rule", "RULES_ANSWER", "POLICY_STOPPED_EARLY", "POLICY_WENT_DEEPER"]

ROUTERS: tuple[str, ...] = ("thresholds", "ppo", "hybrid")

# RouteTrace.override: how the hybrid's answer to a sample relates to the rules' alone
RULES_ANSWER = 0
"""The hybrid answered where the rules alone would have (the policy agreed, or did not decide)."""
POLICY_STOPPED_EARLY = 1
"""The policy stopped the sample at an exit where the rules would have continued; the rules'
own answer (deeper) was never computed."""
POLICY_WENT_DEEPER = 2
"""The policy continued past an exit where the rules would have stopped; that exit's
prediction (the rules' answer) is in ``rule_exit`` / ``rule_pred``."""


@dataclass(frozen=True)
class RouteContext:
    """What the ingress tells a device about routing one request."""

    router: str = "thresholds"
    load: Load = Load()
    weights: CostWeights = CostWeights()
    rl_weight: float | None = None
    """The hybrid's trust in its policy, learnt from label feedback at the ingress (None: the device's configured one)."""

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ConfigError("unknown router", got=self.router, fix=f"use one of {', '.join(ROUTERS)}")
        if self.rl_weight is not None and not 0.0 <= self.rl_weight <= 1.0:
            raise ConfigError("rl_weight must be in [0, 1]", got=self.rl_weight)


@dataclass(frozen=True)
class RouteTrace:
    """Per sample of a batch [B]: how the hybrid's decisions differed from the rules' alone.

    Lets the ingress score both with a client's label later (``POST /v1/feedback``).
    """

    override: torch.Tensor  # [B] int8: RULES_ANSWER, POLICY_STOPPED_EARLY or POLICY_WENT_DEEPER
    rule_exit: torch.Tensor  # [B] int64: the exit the rules alone would have answered at (-1: not reached here)
    rule_pred: torch.Tensor  # [B] int64: that exit's prediction (-1: not reached here)

    @classmethod
    def empty(cls, n: int) -> RouteTrace:
        return cls(torch.zeros(n, dtype=torch.int8), torch.full((n,), -1, dtype=torch.int64), torch.full((n,), -1, dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.override.shape[0])

    def index_select(self, idx: torch.Tensor) -> RouteTrace:
        return RouteTrace(self.override.index_select(0, idx), self.rule_exit.index_select(0, idx), self.rule_pred.index_select(0, idx))

    def absorb(self, where: torch.Tensor, later: RouteTrace) -> None:
        """Merge a later device's trace of the samples at positions ``where``: what an earlier device knew wins."""
        unknown = self.rule_exit.index_select(0, where) < 0
        pos = where[unknown]
        self.rule_exit[pos] = later.rule_exit[unknown]
        self.rule_pred[pos] = later.rule_pred[unknown]
        self.override[pos] = torch.maximum(self.override[pos], later.override[unknown])


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
    """The hybrid router as a stop rule (policy when sure, thresholds otherwise).

    It keeps a :class:`RouteTrace` of the batch it decides for (``trace``): where the policy
    overrode the rules, and the answer the rules alone would have given when it was computed.
    """

    def __init__(self, hybrid: HybridRouter, num_exits: int, on_cloud: bool, ctx: RouteContext) -> None:
        super().__init__(hybrid.policy, num_exits, on_cloud, ctx)  # type: ignore[arg-type]
        self.hybrid = hybrid
        self.trace: RouteTrace | None = None
        self._alive: torch.Tensor | None = None  # positions (in the entering batch) of the samples asked at the current exit

    def stop(self, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None = None) -> torch.Tensor:
        obs = self.obs(k, logits, complexity, prev_pred) if self.hybrid.policy is not None else logits.new_zeros(logits.shape[0], 1)
        d = self.hybrid.decide(obs, k, logits, complexity, prev_pred, rl_weight=self.ctx.rl_weight)
        stop = d.actions == STOP
        self._trace(k, logits, stop, d.rules == STOP)
        return self._remember(logits, stop)

    def _trace(self, k: int, logits: torch.Tensor, stop: torch.Tensor, rules_stop: torch.Tensor) -> None:
        if self.trace is None:  # the first exit this device decides at sees the whole entering batch
            self.trace, self._alive = RouteTrace.empty(logits.shape[0]), torch.arange(logits.shape[0])
        t, alive = self.trace, self._alive
        assert alive is not None and alive.shape[0] == logits.shape[0], "run_stages asks exit by exit, dropping the stopped samples in order"
        fresh = t.rule_exit.index_select(0, alive) < 0  # the rules have not stopped these yet
        deeper = fresh & rules_stop & ~stop
        pos = alive[deeper]
        t.rule_exit[pos] = k
        t.rule_pred[pos] = logits[deeper].argmax(dim=1)
        t.override[pos] = POLICY_WENT_DEEPER
        t.override[alive[fresh & stop & ~rules_stop]] = POLICY_STOPPED_EARLY
        self._alive = alive[~stop]


def make_rule(ctx: RouteContext | None, thresholds: ThresholdRule, policy: PolicyNet | None, hybrid: HybridRouter | None, *, num_exits: int, on_cloud: bool):
    """The stop rule a device applies to one request group."""
    if ctx is None or ctx.router == "thresholds":
        return thresholds
    if ctx.router == "ppo":
        if policy is None:
            raise ConfigError("no PPO router is registered for this model version", fix="train one: dynray router train --model MODEL, or use router 'hybrid' or 'thresholds'")
        return PolicyRule(policy, num_exits, on_cloud, ctx)
    return HybridRule(hybrid or HybridRouter(policy, thresholds), num_exits, on_cloud, ctx)
