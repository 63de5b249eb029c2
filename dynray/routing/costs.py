"""What each routing action costs: MACs, cost units and latency on the edge/cloud topology.

The topology is the serving graph's (DESIGN.md §3): the edge tier hosts stages
``0..edge_stages-1`` with their exits, the cloud tier hosts the whole model and can resume at
any stage from forwarded activations. Exit 0 always runs on the edge. From exit k a sample can

- ``stop``: answer with exit k's prediction;
- ``continue``: run stage k+1 on the same device (an edge sample past the edge's last stage
  moves to the cloud, which is the only place that hosts it);
- ``offload``: run stage k+1 on the cloud (the same as ``continue`` once on the cloud).

Prices come from the device profiles (cost units per million MACs, round trip, speed) and
from per-stage compute times measured on this machine (:func:`measure_stage_ms`), scaled by
each profile's speed as the serving devices do when they simulate a slower device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dynray.errors import ConfigError
from dynray.models.dynamic import DynamicNet
from dynray.serving.scheduling import CLOUD_PROFILE, EDGE_PROFILE, DeviceProfile

__all__ = ["RouteCosts", "TierLoad", "Step", "measure_stage_ms"]


@dataclass(frozen=True)
class TierLoad:
    """One tier's condition while a sample is routed: a slowdown factor and a queue."""

    slowdown: float = 1.0
    """Multiplies the tier's round trip and compute time (5 = the tier is 5x slower)."""
    queue: float = 0.0
    """Calls waiting ahead of this one."""


@dataclass(frozen=True)
class Step:
    """The price of running one stage (and its exit head) for one sample."""

    tier: str
    macs: float
    cost: float
    latency_ms: float


@dataclass(frozen=True, kw_only=True)
class RouteCosts:
    """Per-stage MACs and compute time, the edge/cloud split and the device profiles."""

    stage_macs: tuple[float, ...]
    """MACs of stage k plus exit head k, per sample."""
    stage_ms: tuple[float, ...]
    """Compute time of stage k plus exit head k on this machine, ms per sample (speed 1)."""
    edge_stages: int = 2
    """Stages the edge tier hosts."""
    edge: DeviceProfile = EDGE_PROFILE
    cloud: DeviceProfile = CLOUD_PROFILE

    def __post_init__(self) -> None:
        if len(self.stage_macs) != len(self.stage_ms) or len(self.stage_macs) < 2:
            raise ConfigError("stage_macs and stage_ms need one entry per stage (at least 2)", got=(len(self.stage_macs), len(self.stage_ms)))
        if not 1 <= self.edge_stages <= len(self.stage_macs):
            raise ConfigError("edge_stages must be between 1 and the number of stages", got=self.edge_stages, fix=f"use 1..{len(self.stage_macs)}")

    @property
    def num_exits(self) -> int:
        return len(self.stage_macs)

    def profile(self, tier: str) -> DeviceProfile:
        return self.edge if tier == "edge" else self.cloud

    def typical_call_ms(self, tier: str) -> float:
        """Round trip plus the compute of the stages a tier usually runs in one call."""
        p = self.profile(tier)
        stages = range(self.edge_stages) if tier == "edge" else range(self.edge_stages, self.num_exits)
        return p.rtt_ms + sum(self.stage_ms[k] for k in stages) / p.speed

    def observed_call_ms(self, tier: str, load: TierLoad) -> float:
        """The call-time EWMA the ingress would see for this tier under ``load``."""
        return load.slowdown * self.typical_call_ms(tier) + self.wait_ms(tier, load)

    def wait_ms(self, tier: str, load: TierLoad) -> float:
        """Queueing delay: the calls ahead each take one typical service time (compute only)."""
        p = self.profile(tier)
        return load.queue * load.slowdown * (self.typical_call_ms(tier) - p.rtt_ms)

    def run(self, k: int, tier: str, load: TierLoad, *, new_call: bool) -> Step:
        """Price of running stage ``k`` on ``tier``; ``new_call`` adds the hop and the queue."""
        p = self.profile(tier)
        compute = self.stage_ms[k] / p.speed * load.slowdown
        latency = compute
        if new_call:
            latency += p.rtt_ms * load.slowdown + self.wait_ms(tier, load)
        macs = self.stage_macs[k]
        return Step(tier=tier, macs=macs, cost=macs / 1e6 * p.cost_per_mmac, latency_ms=latency)

    def next_tier(self, k: int, tier: str, offload: bool) -> str:
        """Tier that runs stage k+1 after ``continue`` (offload=False) or ``offload`` at exit k."""
        if tier == "cloud" or offload or k + 1 >= self.edge_stages:
            return "cloud"
        return "edge"

    def to_dict(self) -> dict:
        return {"stage_macs": list(self.stage_macs), "stage_ms": list(self.stage_ms), "edge_stages": self.edge_stages,
                "edge": self.edge.to_dict(), "cloud": self.cloud.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> RouteCosts:
        return cls(stage_macs=tuple(d["stage_macs"]), stage_ms=tuple(d["stage_ms"]), edge_stages=int(d["edge_stages"]),
                   edge=DeviceProfile.from_dict(d["edge"]), cloud=DeviceProfile.from_dict(d["cloud"]))

    @classmethod
    def for_model(cls, model: DynamicNet, *, edge_stages: int = 2, edge: DeviceProfile = EDGE_PROFILE, cloud: DeviceProfile = CLOUD_PROFILE, stage_ms: tuple[float, ...] | None = None) -> RouteCosts:
        p = model.mac_profile
        macs = tuple(float(s + e) for s, e in zip(p.stage, p.exit, strict=True))
        return cls(stage_macs=macs, stage_ms=stage_ms or measure_stage_ms(model), edge_stages=edge_stages, edge=edge, cloud=cloud)


@torch.no_grad()
def measure_stage_ms(model: DynamicNet, *, repeats: int = 50) -> tuple[float, ...]:
    """Median batch-1 compute time of each stage plus its exit head on this machine, in ms."""
    model.eval()
    h = torch.rand(1, *model.cfg.input_shape)
    out = []
    for stage, head in zip(model.stages, model.exits, strict=True):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            nxt = stage(h)
            head(nxt)
            times.append((time.perf_counter() - t0) * 1000)
        h = nxt
        out.append(float(sorted(times)[len(times) // 2]))
    return tuple(out)
