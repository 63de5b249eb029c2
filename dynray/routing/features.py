"""The router's observation: one vector layout shared by training, evaluation and serving.

The same function builds observations from a training cache (the environment), from cached
test outputs (the benchmark) and from live exit logits inside a device (serving), so the
exported policy sees exactly what it was trained on. Layout of one observation::

    [0:3]   confidence at the current exit: max-softmax, top-2 margin, 1 - normalised entropy
    [3]     "nines" of the max-softmax, -log10(1 - p_max + 1e-6) / 6: resolves 0.999 from 0.9999,
            where a tanh MLP cannot tell raw probabilities apart and early-exit decisions live
    [4]     agreement: exit k's argmax equals exit k-1's (0 at the first exit)
    [5]     the previous exit's "nines" (0 at the first exit)
    [6:10]  the sample's complexity features (normalised to [0, 1] by the model)
    [10:10+D] one-hot decision exit (D = K - 1 exits where a decision is made)
    [10+D]  1 if the current exit ran on the cloud tier, else 0
    next 4  load: edge queue, edge call-time EWMA, cloud queue, cloud call-time EWMA (scaled)
    last 3  cost weights: lambda_cost, lambda_lat, lambda_macs (scaled)

Shape legend: B samples, C classes, F complexity features, D decision exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynray.complexity import FEATURE_NAMES
from dynray.errors import InputValidationError

__all__ = ["Load", "CostWeights", "obs_dim", "build_observation", "ACTIONS", "STOP", "CONTINUE", "OFFLOAD", "check_finite", "OBS_BOUND"]

STOP, CONTINUE, OFFLOAD = 0, 1, 2
ACTIONS: tuple[str, ...] = ("stop", "continue", "offload")
_N_CX = len(FEATURE_NAMES)
OBS_BOUND = 10.0  # every feature is clipped to [-10, 10] (the environment's observation space)
_QUEUE_SCALE = math.log1p(64.0)  # queue lengths are log-scaled: 0 -> 0, 64 -> 1
_MS_SCALE = 250.0  # call-time EWMA in ms / 250
_LAMBDA_COST_RANGE = (1e-4, 1.0)  # log-scaled to [0, 1]; 0 maps to 0
_LAT_SCALE = 100.0  # lambda_lat per ms * 100
_MACS_SCALE = 10.0  # lambda_macs per million MACs * 10


@dataclass(frozen=True)
class Load:
    """Live load of both tiers as the ingress sees it (what the router conditions on)."""

    edge_queue: float = 0.0
    """Requests waiting at the least-loaded edge replica."""
    edge_ms: float = 0.0
    """EWMA of one edge call's time as seen by the ingress (network + wait + compute), ms."""
    cloud_queue: float = 0.0
    cloud_ms: float = 0.0

    def vector(self) -> list[float]:
        return [
            math.log1p(max(self.edge_queue, 0.0)) / _QUEUE_SCALE,
            self.edge_ms / _MS_SCALE,
            math.log1p(max(self.cloud_queue, 0.0)) / _QUEUE_SCALE,
            self.cloud_ms / _MS_SCALE,
        ]


@dataclass(frozen=True)
class CostWeights:
    """The reward's prices: reward = correct - λ_cost·cost - λ_lat·latency_ms - λ_macs·MMACs."""

    cost: float = 0.01
    """Per cost unit (DeviceProfile.cost_per_mmac x million MACs on that device)."""
    lat: float = 0.0
    """Per millisecond of request latency."""
    macs: float = 0.0
    """Per million MACs, wherever they run."""

    def __post_init__(self) -> None:
        for name in ("cost", "lat", "macs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InputValidationError(f"cost weight lambda_{name} must be a finite number >= 0", got=v, fix="e.g. CostWeights(cost=0.01, lat=0.001)")

    def vector(self) -> list[float]:
        lo, hi = (math.log10(x) for x in _LAMBDA_COST_RANGE)
        c = 0.0 if self.cost <= 0 else (math.log10(self.cost) - lo) / (hi - lo)
        return [c, self.lat * _LAT_SCALE, self.macs * _MACS_SCALE]


def _nines(p_max: torch.Tensor) -> torch.Tensor:
    return -torch.log10(1.0 - p_max + 1e-6) / 6.0


def obs_dim(num_exits: int) -> int:
    return 6 + _N_CX + (num_exits - 1) + 1 + 4 + 3


def check_finite(obs: torch.Tensor) -> torch.Tensor:
    """Refuse non-finite observations (a NaN would silently pick an arbitrary action)."""
    if not torch.isfinite(obs).all():
        bad = (~torch.isfinite(obs)).nonzero()[:3].tolist()
        raise InputValidationError("router observation has non-finite values", got=f"positions {bad}", fix="check the load report and cost weights; the exit logits must be finite")
    return obs


def build_observation(
    k: int,
    num_exits: int,
    logits: torch.Tensor,
    complexity: torch.Tensor,
    prev_pred: torch.Tensor | None,
    on_cloud: torch.Tensor | bool,
    load: torch.Tensor | Load,
    weights: torch.Tensor | CostWeights,
    prev_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Observations of B samples at decision exit ``k`` (0-based, k < num_exits - 1).

    logits [B, C], complexity [B, F] (or [B, 0] when the model has none: zeros are used),
    prev_pred [B] or None, prev_logits [B, C] (exit k-1's logits) or None, on_cloud bool or [B], load ``Load`` or [B, 4] (already scaled),
    weights ``CostWeights`` or [B, 3] (already scaled)  ->  [B, obs_dim] float32
    """
    if not 0 <= k < num_exits - 1:
        raise InputValidationError("decision exit out of range", got=k, fix=f"decisions happen at exits 0..{num_exits - 2}")
    b = logits.shape[0]
    logp = F.log_softmax(logits.float(), dim=1)  # [B, C]
    p = logp.exp()
    top2 = p.topk(min(2, p.shape[1]), dim=1).values  # [B, 2]
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0.0)
    neg_h = 1.0 - (-(p * logp).sum(dim=1)) / math.log(p.shape[1])
    nines = _nines(top2[:, 0])
    agree = torch.zeros(b) if prev_pred is None else (logits.argmax(dim=1) == prev_pred).float()
    prev_nines = torch.zeros(b) if prev_logits is None else _nines(F.softmax(prev_logits.float(), dim=1).amax(dim=1))
    cx = complexity.float() if complexity.shape[1] == _N_CX else torch.zeros(b, _N_CX)
    onehot = F.one_hot(torch.full((b,), k), num_exits - 1).float()  # [B, D]
    cloud = (on_cloud.float() if isinstance(on_cloud, torch.Tensor) else torch.full((b,), float(on_cloud))).reshape(b, 1)
    lv = torch.tensor(load.vector()).expand(b, 4) if isinstance(load, Load) else load.float()
    wv = torch.tensor(weights.vector()).expand(b, 3) if isinstance(weights, CostWeights) else weights.float()
    obs = torch.cat([top2[:, :1], margin.unsqueeze(1), neg_h.unsqueeze(1), nines.unsqueeze(1), agree.unsqueeze(1), prev_nines.unsqueeze(1), cx, onehot, cloud, lv, wv], dim=1)
    return check_finite(obs).clamp(-OBS_BOUND, OBS_BOUND)
