"""The hybrid router: the learned policy where it is sure, calibrated thresholds elsewhere.

At each exit the policy proposes an action with probability ``p_max``. It decides when

    p_max >= min_confidence + (1 - rl_weight) * (1 - min_confidence)

so ``rl_weight = 1`` trusts every policy decision at least ``min_confidence`` sure and
``rl_weight = 0`` never uses the policy. Otherwise, or when there is no policy, the threshold
rule decides (stop or continue). ``rl_weight`` adapts online: :meth:`HybridRouter.observe`
takes the rewards that the policy alone and the rules alone earned (or would have earned) on
recent requests, and moves the weight towards whichever did better.

The safety gate (:func:`fit_gate`) decides once, on a held-out split, whether the policy may
decide at all at an operating point: the hybrid is run against the rules alone on the same
samples, and unless it earns more reward by ``gate_z`` standard errors of the paired
difference, the gate stays shut and the hybrid *is* the thresholds there. So the hybrid is
never worse than the thresholds by more than the noise of the split the gate saw.

Shape legend: B samples, D observation size, A actions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dynray.errors import ConfigError
from dynray.routing.features import CONTINUE, STOP, check_finite
from dynray.routing.policy import PolicyNet
from dynray.routing.rollout import threshold_decide
from dynray.thresholds import ThresholdRule

__all__ = ["HybridConfig", "HybridRouter", "Decision", "TrustWeight", "Gate", "gate_from_rewards", "fit_gate"]


@dataclass(frozen=True, kw_only=True)
class HybridConfig:
    """How much the hybrid router trusts its policy, and how fast that trust adapts."""

    min_confidence: float = 0.9
    """Least action probability at which the policy may decide (with rl_weight = 1)."""
    rl_weight: float = 0.8
    """Initial trust in the policy, in [0, 1]."""
    adapt_rate: float = 0.02
    """Step of rl_weight per observed batch, times tanh(advantage / reward_scale)."""
    reward_scale: float = 0.02
    """Reward difference that counts as a clear win for one side."""
    ewma: float = 0.1
    """Smoothing of the observed advantage of the policy over the rules."""
    gate_z: float = 1.0
    """The safety gate opens only where the hybrid's mean reward on the held-out split beats the
    rules' by this many standard errors of the paired difference (0: any gain)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_confidence <= 1.0 or not 0.0 <= self.rl_weight <= 1.0:
            raise ConfigError("min_confidence must be in (0, 1] and rl_weight in [0, 1]", got=(self.min_confidence, self.rl_weight), fix="e.g. min_confidence=0.9, rl_weight=0.8")
        if self.adapt_rate < 0 or self.reward_scale <= 0 or not 0 < self.ewma <= 1:
            raise ConfigError("adapt_rate must be >= 0, reward_scale > 0 and ewma in (0, 1]", got=(self.adapt_rate, self.reward_scale, self.ewma))
        if not math.isfinite(self.gate_z) or self.gate_z < 0:
            raise ConfigError("gate_z must be a finite number >= 0", got=self.gate_z, fix="e.g. gate_z=1.0 (one standard error)")


@dataclass(frozen=True)
class Gate:
    """The safety gate's verdict at one operating point, from a held-out split."""

    open: bool
    """The policy may decide (else the hybrid applies the thresholds alone)."""
    gain: float
    """Mean reward per sample of the hybrid minus the rules', on the split."""
    se: float
    """Standard error of ``gain`` (paired differences)."""
    n: int
    """Samples compared."""
    z: float
    """Standard errors ``gain`` had to clear."""

    def to_dict(self) -> dict:
        return {"open": self.open, "gain": self.gain, "se": self.se, "n": self.n, "z": self.z}

    @classmethod
    def from_dict(cls, d: dict) -> Gate:
        return cls(open=bool(d["open"]), gain=float(d["gain"]), se=float(d["se"]), n=int(d["n"]), z=float(d["z"]))


def gate_from_rewards(hybrid_reward: torch.Tensor, rules_reward: torch.Tensor, *, z: float) -> Gate:
    """Rewards [N] the hybrid and the rules alone earned on the same held-out samples -> the gate."""
    if hybrid_reward.shape != rules_reward.shape or hybrid_reward.ndim != 1 or hybrid_reward.numel() < 2:
        raise ConfigError("the gate needs two reward vectors of the same length >= 2", got=(tuple(hybrid_reward.shape), tuple(rules_reward.shape)))
    d = hybrid_reward.double() - rules_reward.double()
    gain, se = float(d.mean()), float(d.std(unbiased=True)) / math.sqrt(d.numel())
    if not math.isfinite(gain):
        raise ConfigError("non-finite reward", got=gain, fix="rewards are correct - costs; check the cost weights")
    return Gate(open=gain > 0 and gain > z * se, gain=gain, se=se, n=int(d.numel()), z=z)


@dataclass(frozen=True)
class Decision:
    actions: torch.Tensor  # [B] int64
    by_policy: torch.Tensor  # [B] bool: the policy decided (else the rules)
    rules: torch.Tensor | None = None  # [B] int64: what the rules alone would do here


class TrustWeight:
    """``rl_weight`` and the online rule that moves it (see the module docstring).

    The hybrid router in the benchmark and the serving ingress (with clients' labels,
    :mod:`dynray.serving.feedback`) adapt their trust with this one rule.
    """

    def __init__(self, cfg: HybridConfig = HybridConfig(), *, value: float | None = None) -> None:
        self.cfg = cfg
        self.value = cfg.rl_weight if value is None else value
        self.advantage = 0.0
        self.updates = 0

    def observe(self, policy_reward: torch.Tensor, rules_reward: torch.Tensor) -> float:
        """Rewards [B] the policy alone and the rules alone earned on the same requests.

        Only requests where the two differ move the weight; returns the new weight.
        """
        if policy_reward.shape != rules_reward.shape or not policy_reward.numel():
            raise ConfigError("observe() needs two reward tensors of the same non-empty shape", got=(tuple(policy_reward.shape), tuple(rules_reward.shape)))
        d = policy_reward.double() - rules_reward.double()
        d = d[d != 0]  # requests where both would have done the same carry no evidence
        if not d.numel():
            return self.value
        diff = float(d.mean())
        if not math.isfinite(diff):
            raise ConfigError("non-finite reward", got=diff, fix="rewards are correct - costs; check the cost weights")
        self.advantage += self.cfg.ewma * (diff - self.advantage)
        step = self.cfg.adapt_rate * math.tanh(self.advantage / self.cfg.reward_scale)
        self.value = min(1.0, max(0.0, self.value + step))
        self.updates += 1
        return self.value


class HybridRouter:
    """Policy + thresholds, with an adaptive trust weight (see the module docstring)."""

    def __init__(self, policy: PolicyNet | None, rule: ThresholdRule, cfg: HybridConfig = HybridConfig(), *, gate: Gate | None = None) -> None:
        self.policy, self.rule, self.cfg, self.gate = policy, rule, cfg, gate
        self.trust = TrustWeight(cfg)
        self.decisions = {"policy": 0, "rules": 0}

    @property
    def rl_weight(self) -> float:
        return self.trust.value

    @property
    def advantage(self) -> float:
        return self.trust.advantage

    def needed_confidence(self, rl_weight: float | None = None) -> float:
        """Least action probability at which the policy decides, at ``rl_weight`` (default: this router's)."""
        c, w = self.cfg.min_confidence, self.rl_weight if rl_weight is None else rl_weight
        return c + (1.0 - w) * (1.0 - c)

    def decide(self, obs: torch.Tensor, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None,
               *, rl_weight: float | None = None) -> Decision:
        """obs [B, D], logits [B, C], complexity [B, F] -> actions at exit k.

        ``rl_weight``: the trust to apply (the serving ingress sends the one its label
        feedback learnt); None: this router's own.
        """
        rules = torch.where(self.rule.stop(k, logits, complexity, prev_pred), STOP, CONTINUE)
        w = self.rl_weight if rl_weight is None else rl_weight
        if self.policy is None or (self.gate is not None and not self.gate.open) or w <= 0.0:
            self.decisions["rules"] += rules.shape[0]
            return Decision(rules, torch.zeros_like(rules, dtype=torch.bool), rules)
        act, probs = self.policy.act(check_finite(obs))
        sure = probs.amax(dim=1) >= self.needed_confidence(w) - 1e-9
        n_pol = int(sure.sum())
        self.decisions["policy"] += n_pol
        self.decisions["rules"] += sure.shape[0] - n_pol
        return Decision(torch.where(sure, act, rules), sure, rules)

    def decide_fn(self):
        """This router as a :data:`~dynray.routing.rollout.Decide` function."""

        def decide(obs, k, logits, complexity=None, prev_pred=None):
            return self.decide(obs, k, logits, complexity, prev_pred).actions

        decide.needs_context = True  # type: ignore[attr-defined]
        return decide

    def observe(self, policy_reward: torch.Tensor, rules_reward: torch.Tensor) -> float:
        """Rewards [B] the policy alone and the rules alone earned on the same requests (:meth:`TrustWeight.observe`)."""
        return self.trust.observe(policy_reward, rules_reward)


def fit_gate(policy: PolicyNet | None, rule: ThresholdRule, cfg: HybridConfig, reward_of: Callable[[Callable], torch.Tensor]) -> Gate:
    """The safety gate of the hybrid (``policy`` + ``rule``, trust at ``cfg.rl_weight``).

    ``reward_of(decide)`` replays a held-out split with a decision function and returns the
    reward [N] each sample earned at the operating point (e.g. a ``rollout`` on cached val
    exits with that point's cost weights). No policy: a shut gate.
    """
    if policy is None:
        return Gate(open=False, gain=0.0, se=0.0, n=0, z=cfg.gate_z)
    return gate_from_rewards(reward_of(HybridRouter(policy, rule, cfg).decide_fn()), reward_of(threshold_decide(rule)), z=cfg.gate_z)
