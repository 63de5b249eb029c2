"""Gymnasium environment for the routing decision (RLlib trains PPO on it).

An episode is one sample walking the exits of a registered model. The sample's real exit
outputs come from a cache (:mod:`dynray.routing.cache`), so a step is a table lookup, not a
forward pass. At each exit but the last the agent picks ``stop``, ``continue`` (next stage on
this device) or ``offload`` (next stage on the cloud); see :mod:`dynray.routing.costs`.

Reward, paid as the costs occur (undiscounted)::

    correct - λ_cost·cost - λ_lat·latency_ms - λ_macs·MMACs

With ``shaping=True`` (the default) the correctness part is paid as potential-based shaping
(Ng, Harada & Russell 1999) with potential Φ = "the current exit is right": a step from exit
k to k+1 earns ``correct_{k+1} - correct_k``, stopping earns 0, and the return is the reward
above minus ``correct_0``, a constant of the episode that no action changes. The optimal
policy is the same; the variance is far lower, since for the many samples every exit gets
right the return is just the (deterministic) price. ``info["reward"]`` is always unshaped.

The cost weights are drawn per episode and are part of the observation, so one policy
serves every operating point. So is the live load: each episode draws a condition for the
edge and cloud tiers (a slowdown factor and a queue), priced with service times measured on
the served model (:func:`dynray.routing.costs.measure_stage_ms`), and the agent observes the
queue and call-time EWMA the ingress would report, with measurement noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import gymnasium as gym
import numpy as np

from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords
from dynray.routing.costs import RouteCosts, TierLoad
from dynray.routing.features import ACTIONS, OBS_BOUND, STOP, CostWeights, Load, build_observation, obs_dim
from dynray.routing.rollout import observed_load

__all__ = ["LoadSampler", "WeightSampler", "RouterEnvConfig", "RoutingEnv"]


def _range(name: str, r: tuple[float, float]) -> None:
    if len(r) != 2 or not all(math.isfinite(x) and x >= 0 for x in r) or r[0] > r[1]:
        raise ConfigError(f"{name} must be a (low, high) pair with 0 <= low <= high", got=r, fix=f"e.g. {name}=(0.001, 0.1)")


@dataclass(frozen=True, kw_only=True)
class WeightSampler:
    """Cost weights drawn per episode (log-uniform within each range; 0 with probability p_zero)."""

    cost: tuple[float, float] = (5e-4, 5e-2)
    """λ_cost range per cost unit."""
    lat: tuple[float, float] = (1e-4, 1e-2)
    """λ_lat range per ms."""
    lat_p_zero: float = 0.3
    """Share of episodes that ignore latency (the static operating points)."""
    macs: tuple[float, float] = (0.0, 0.0)
    """λ_macs range per million MACs (default: cost already prices MACs)."""

    def __post_init__(self) -> None:
        for name in ("cost", "lat", "macs"):
            _range(f"lambda_{name}", getattr(self, name))
        if not 0.0 <= self.lat_p_zero <= 1.0:
            raise ConfigError("lat_p_zero must be in [0, 1]", got=self.lat_p_zero)

    @staticmethod
    def _draw(rng: np.random.Generator, r: tuple[float, float]) -> float:
        lo, hi = r
        if hi <= 0:
            return 0.0
        if lo <= 0:
            return float(rng.uniform(0.0, hi))
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    def sample(self, rng: np.random.Generator) -> CostWeights:
        lat = 0.0 if rng.random() < self.lat_p_zero else self._draw(rng, self.lat)
        return CostWeights(cost=self._draw(rng, self.cost), lat=lat, macs=self._draw(rng, self.macs))


@dataclass(frozen=True, kw_only=True)
class LoadSampler:
    """Tier conditions drawn per episode: slowdowns and queues, plus observation noise."""

    edge_p_slow: float = 0.2
    """Share of episodes where the edge tier is slowed down."""
    cloud_p_slow: float = 0.5
    """Share of episodes where the cloud tier is slowed down."""
    slowdown: tuple[float, float] = (1.0, 10.0)
    """Log-uniform range of a slowed tier's factor on round trip and compute."""
    max_queue: int = 16
    """Queues are uniform in 0..max_queue in half of the episodes, else empty."""
    noise: float = 0.1
    """Relative noise of the observed call-time EWMA."""

    def __post_init__(self) -> None:
        _range("slowdown", self.slowdown)
        if self.slowdown[0] < 1.0:
            raise ConfigError("slowdown factors must be >= 1", got=self.slowdown)
        if not (0 <= self.edge_p_slow <= 1 and 0 <= self.cloud_p_slow <= 1 and self.max_queue >= 0 and self.noise >= 0):
            raise ConfigError("bad LoadSampler probabilities, queue or noise", got=asdict(self), fix="probabilities in [0, 1], max_queue >= 0, noise >= 0")

    def _tier(self, rng: np.random.Generator, p_slow: float) -> TierLoad:
        lo, hi = self.slowdown
        f = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if rng.random() < p_slow else 1.0
        q = float(rng.integers(0, self.max_queue + 1)) if rng.random() < 0.5 else 0.0
        return TierLoad(slowdown=f, queue=q)

    def sample(self, rng: np.random.Generator, costs: RouteCosts) -> tuple[TierLoad, TierLoad, Load]:
        edge, cloud = self._tier(rng, self.edge_p_slow), self._tier(rng, self.cloud_p_slow)
        true = observed_load(costs, edge, cloud)
        jit = 1.0 + self.noise * rng.standard_normal(2)
        seen = Load(edge_queue=edge.queue, edge_ms=max(0.0, true.edge_ms * jit[0]), cloud_queue=cloud.queue, cloud_ms=max(0.0, true.cloud_ms * jit[1]))
        return edge, cloud, seen


@dataclass(frozen=True, kw_only=True)
class RouterEnvConfig:
    """What the environment replays and how it draws operating points and load."""

    costs: RouteCosts
    """Topology, per-stage MACs and measured compute times, device profiles."""
    weights: WeightSampler = field(default_factory=WeightSampler)
    load: LoadSampler = field(default_factory=LoadSampler)
    shaping: bool = True
    """Pay correctness as potential-based shaping (same optimal policy, lower variance)."""
    hard_share: float = 0.5
    """Share of episodes drawn from the samples least confident at exit 0 (the rest uniformly).
    Escalation decisions are rare under uniform sampling; the weighting depends only on what
    every later observation also carries (exit-0 confidence is the "previous nines" at exit 1),
    so it adds experience where decisions are hard without changing what is optimal there."""
    hard_quantile: float = 0.2
    """The hard pool: samples whose exit-0 max-softmax is in this lowest quantile."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.hard_share <= 1.0 and 0.0 < self.hard_quantile <= 1.0):
            raise ConfigError("hard_share must be in [0, 1] and hard_quantile in (0, 1]", got=(self.hard_share, self.hard_quantile))


class RoutingEnv(gym.Env):
    """One sample per episode; actions stop / continue / offload at each exit but the last.

    RLlib builds it from an ``env_config`` dict ``{"records": ExitRecords, "config": RouterEnvConfig}``
    (``jobs.train_router`` puts them there; both pickle to the env runners).
    ``reset(options=...)`` may fix ``sample`` (int), ``weights`` (CostWeights) and
    ``tiers`` ((edge TierLoad, cloud TierLoad)) for evaluation.
    """

    metadata = {"render_modes": []}

    def __init__(self, env_config: dict) -> None:
        rec, cfg = env_config.get("records"), env_config.get("config")
        if not isinstance(rec, ExitRecords) or not isinstance(cfg, RouterEnvConfig):
            raise ConfigError("RoutingEnv needs env_config={'records': ExitRecords, 'config': RouterEnvConfig}", got=sorted(env_config),
                              fix="load the records with dynray.routing.cache.load_exit_cache (create them with `dynray router cache`)")
        if rec.num_exits != cfg.costs.num_exits:
            raise ConfigError("cached outputs and route costs disagree on the number of exits", got=(rec.num_exits, cfg.costs.num_exits),
                              fix="build RouteCosts.for_model from the same model version as the cache")
        self.rec, self.cfg = rec, cfg
        self.k_last = rec.num_exits - 1
        self.observation_space = gym.spaces.Box(-OBS_BOUND, OBS_BOUND, shape=(obs_dim(rec.num_exits),), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(ACTIONS))
        self._correct = rec.correct.numpy()
        # The per-sample part of every observation is fixed by the cache: build it once with
        # the shared builder, then fill in tier, load and weights per step (fast, and equal
        # to build_observation by construction; a test checks it).
        k_dec = rec.num_exits - 1
        self._base = np.stack([
            build_observation(k, rec.num_exits, rec.logits[k], rec.complexity, rec.prev_pred(k), False, Load(), CostWeights(cost=0.0),
                              rec.logits[k - 1] if k > 0 else None).numpy()
            for k in range(k_dec)
        ]).astype(np.float32)  # [K-1, N, D]
        self._cloud_col = self._base.shape[2] - 8
        conf0 = self._base[0, :, 0]  # exit-0 max-softmax
        self._hard = np.flatnonzero(conf0 <= np.quantile(conf0, cfg.hard_quantile))

    def _obs(self) -> np.ndarray:
        o = self._base[self._k, self._n].copy()
        o[self._cloud_col] = 1.0 if self._tier == "cloud" else 0.0
        o[-7:] = self._tail
        return np.clip(o, -OBS_BOUND, OBS_BOUND)

    def _charge(self, k: int, tier: str, new_call: bool) -> float:
        s = self.cfg.costs.run(k, tier, self._tiers[tier], new_call=new_call)
        self._totals["cost"] += s.cost
        self._totals["latency_ms"] += s.latency_ms
        self._totals["macs"] += s.macs
        return -(self._w.cost * s.cost + self._w.lat * s.latency_ms + self._w.macs * s.macs / 1e6)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        opts = options or {}
        rng = self.np_random
        if "sample" in opts:
            self._n = int(opts["sample"])
        elif rng.random() < self.cfg.hard_share:
            self._n = int(self._hard[rng.integers(0, len(self._hard))])
        else:
            self._n = int(rng.integers(0, self.rec.labels.shape[0]))
        self._w = opts.get("weights") or self.cfg.weights.sample(rng)
        if "tiers" in opts:
            edge, cloud = opts["tiers"]
            self._seen = observed_load(self.cfg.costs, edge, cloud)
        else:
            edge, cloud, self._seen = self.cfg.load.sample(rng, self.cfg.costs)
        self._tiers = {"edge": edge, "cloud": cloud}
        self._tail = np.asarray(self._seen.vector() + self._w.vector(), dtype=np.float32)
        self._k, self._tier = 0, "edge"
        self._totals = {"cost": 0.0, "latency_ms": 0.0, "macs": 0.0}
        self._charge(0, "edge", True)  # every sample pays exit 0 before the first decision
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = int(action)
        if not self.action_space.contains(a):
            raise ConfigError("action out of range", got=action, fix=f"use 0..{len(ACTIONS) - 1} ({', '.join(ACTIONS)})")
        reward = 0.0
        if a != STOP:
            nxt = self.cfg.costs.next_tier(self._k, self._tier, offload=a != 1)
            reward += self._charge(self._k + 1, nxt, new_call=nxt != self._tier)
            if self.cfg.shaping:
                reward += float(self._correct[self._k + 1, self._n]) - float(self._correct[self._k, self._n])
            self._k, self._tier = self._k + 1, nxt
        done = a == STOP or self._k == self.k_last
        info: dict = {}
        if done:
            ok = bool(self._correct[self._k, self._n])
            if not self.cfg.shaping:
                reward += float(ok)
            unshaped = float(ok) - (self._w.cost * self._totals["cost"] + self._w.lat * self._totals["latency_ms"] + self._w.macs * self._totals["macs"] / 1e6)
            info = {"exit": self._k, "tier": self._tier, "correct": ok, "reward": unshaped, **self._totals}
        return self._obs() if not done else np.zeros(self.observation_space.shape, np.float32), float(reward), done, False, info
