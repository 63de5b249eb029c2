"""The federated server's side: the run's config, the broadcast, FedAvg and the round record.

FedAvg (McMahan et al., 2017): each client sends ``w_i * delta_i`` with ``w_i`` its share of
the selected clients' samples, and the server adds ``sum_i w_i delta_i / sum_{i alive} w_i`` to
the global weights, so a client that drops out only leaves its data out of that round. With
secure aggregation the server only ever holds the masked vectors and their sum.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from safetensors.numpy import load as numpy_load
from safetensors.torch import save as safetensors_save

from dynray.errors import ConfigError
from dynray.federated.codec import CodecSpec, Layout, decode
from dynray.federated.secagg import check_threshold, unmask_sum
from dynray.fileio import sha256_bytes
from dynray.models.dynamic import DynamicNet

__all__ = ["FedConfig", "RoundRecord", "Server"]


@dataclass(frozen=True, kw_only=True)
class FedConfig:
    """One federated run."""

    clients: int = 4
    """Device actors taking part, each holding one non-IID shard."""
    rounds: int = 20
    """Communication rounds."""
    local_epochs: int = 1
    """Passes over its shard each client makes per round."""
    alpha: float = 0.5
    """Dirichlet concentration of the label split (smaller = less alike clients)."""
    codec: CodecSpec = field(default_factory=CodecSpec)
    """How clients encode their updates."""
    secure_agg: bool = False
    """Mask every update so the server sees only their sum (needs the dense codec)."""
    secagg_threshold: int = 3
    """Least updates the server may unmask in a round (a round with fewer is skipped)."""
    seed: int = 0
    """Seeds the split, the initial model and each client's data order."""

    def __post_init__(self) -> None:
        if self.clients < 1 or self.rounds < 1 or self.local_epochs < 1:
            raise ConfigError("clients, rounds and local_epochs must be >= 1", got={"clients": self.clients, "rounds": self.rounds, "local_epochs": self.local_epochs},
                              fix="e.g. --clients 4 --rounds 20 --local-epochs 1")
        if self.alpha <= 0:
            raise ConfigError("the Dirichlet concentration must be positive", got=self.alpha, fix="e.g. --alpha 0.5")
        if self.secure_agg:
            check_threshold(self.clients, self.secagg_threshold)
            if self.codec.kind != "dense":
                raise ConfigError("secure aggregation sums masked dense vectors; a compressed update cannot be masked", got=self.codec.kind,
                                  fix="use --kind dense with --secure-agg, or drop --secure-agg to compress")


@dataclass(frozen=True)
class RoundRecord:
    """What one round did."""

    round: int
    clients: list[int]  # whose update went into the average
    dropped: list[int]  # selected, but lost (died or late); their update, if any, was discarded
    bytes_up: int  # update payloads (and mask corrections) the server received
    bytes_down: int  # broadcast bytes the clients received
    bytes_keys: int  # public keys relayed for secure aggregation (both ways)
    accuracy: float | None  # the global model's test accuracy after the round (last exit)
    skipped: bool  # too few updates: the global model was kept
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Server:
    """Holds the global model; makes broadcasts and applies aggregated updates."""

    def __init__(self, model: DynamicNet, cfg: FedConfig) -> None:
        self.model, self.cfg = model, cfg
        self.layout = Layout.of(model)

    def broadcast(self) -> tuple[bytes, str]:
        """The global weights as the bytes every client gets, and their sha256."""
        payload = safetensors_save({k: v.detach().contiguous() for k, v in self.model.state_dict().items()})
        return payload, sha256_bytes(payload)

    def weights(self, samples: dict[int, int]) -> dict[int, float]:
        """Each client's share of the round's samples."""
        total = sum(samples.values())
        return {c: n / total for c, n in samples.items()}

    def aggregate(self, payloads: dict[int, bytes], weights: dict[int, float]) -> torch.Tensor:
        """sum_i w_i delta_i / sum_i w_i over the clients whose payload arrived (plain FedAvg)."""
        total = sum(decode(p, self.layout.size, self.cfg.codec) for p in payloads.values())
        return total / sum(weights[c] for c in payloads)

    def aggregate_masked(self, payloads: dict[int, bytes], corrections: list[bytes], weights: dict[int, float]) -> torch.Tensor:
        """The same average from masked vectors: only their sum is ever unmasked."""
        masked = [numpy_load(p)["masked"] for p in payloads.values()]
        fixes = [numpy_load(c)["correction"] for c in corrections]
        return unmask_sum(masked, fixes, self.cfg.secagg_threshold) / sum(weights[c] for c in payloads)

    def apply(self, delta: torch.Tensor, *, first_round: bool) -> None:
        """Add the averaged ``delta`` ([n]) to the global weights."""
        state = self.model.state_dict()
        new = self.layout.unflatten(self.layout.flatten(state) + delta)
        if not all(math.isfinite(float(v.abs().max())) for v in new.values() if v.numel()):
            raise ConfigError("the averaged update is not finite", got="nan/inf", fix="lower the learning rate (--lr) or the local epochs")
        self.model.load_state_dict({**state, **new})
        if first_round:  # the clients fitted the complexity normalisation; their average is the global one
            self.model.complexity.fitted.fill_(True)
