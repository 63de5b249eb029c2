"""Ray job: federated learning (FedAvg) across device actors on edge nodes; registers the model.

    python -m jobs.federated --dataset mnist-5k --clients 4 --rounds 20
    python -m jobs.federated --kind topk --topk-frac 0.1          # compressed updates, error feedback
    python -m jobs.federated --secure-agg --secagg-threshold 3      # the server sees only the sum
    python -m jobs.federated --drop-client 2 --drop-round 1         # kill a client mid-round
    dynray federated [flags]        dynray submit federated -- [flags]

Each client is a Ray actor that reserves the ``edge`` resource (an edge node of the cluster)
and holds one shard of a Dirichlet split of the training labels; only indices leave the
driver. The global weights go to the clients as bytes with their sha256 (a client refuses a
mismatch), and updates come back as bytes: both are counted as they arrive. The final
model is registered as ``fedavg-DATASET``, then calibrated on val (a child version), so it
serves like any other.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from dynray.data import load_dataset
from dynray.errors import ConfigError
from dynray.evaluation import collect_exit_outputs
from dynray.federated.server import FedConfig, RoundRecord
from dynray.flags import guarded, parse, setup_logging
from dynray.models.defaults import default_model_config
from dynray.pipeline import calibrate_and_register
from dynray.store import save_model
from dynray.thresholds import CalibrationTarget, ThresholdRule
from dynray.training import TrainConfig
from actors.federated import DropPlan, run_federated
from jobs._ray import connect, job_registry

__all__ = ["Config", "Result", "run", "main"]
log = logging.getLogger(__name__)
_T = TrainConfig


@dataclass(frozen=True, kw_only=True)
class Config:
    """FedAvg across device actors on edge nodes, each with a non-IID shard; register the model."""

    dataset: str = _T.dataset
    """Dataset name."""
    fed: Annotated[FedConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=FedConfig)
    """The federated run: clients, rounds, split, update codec, secure aggregation."""
    lr: float = _T.lr
    """Peak learning rate of the clients' local training (cosine over all rounds)."""
    batch_size: int = _T.batch_size
    """Samples per local step."""
    tier: str = "edge"
    """Ray resource the client actors reserve (the cluster's edge nodes)."""
    cpus_per_client: float = 1.0
    """CPUs each client actor reserves."""
    round_timeout_s: float = 300.0
    """A client whose update has not arrived by then is dropped from the round."""
    drop_client: int | None = None
    """Kill this client's actor while it trains in --drop-round (the drop-out test)."""
    drop_round: int = 1
    """The round --drop-client is killed in (0-based)."""
    max_drop: float = 0.005
    """Calibration target of the registered model: val accuracy lost by early exits."""
    register: bool = True
    """Register the final model (and its calibrated child); --no-register only measures."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""

    def __post_init__(self) -> None:
        if self.drop_client is not None and not (0 <= self.drop_client < self.fed.clients and 0 <= self.drop_round < self.fed.rounds):
            raise ConfigError("--drop-client/--drop-round name no client and round of this run", got={"drop_client": self.drop_client, "drop_round": self.drop_round},
                              fix=f"pick a client in 0..{self.fed.clients - 1} and a round in 0..{self.fed.rounds - 1}")
        if self.round_timeout_s <= 0 or self.cpus_per_client <= 0:
            raise ConfigError("round_timeout_s and cpus_per_client must be positive", got=(self.round_timeout_s, self.cpus_per_client), fix="e.g. --round-timeout-s 300 --cpus-per-client 1")

    def recipe(self) -> TrainConfig:
        return TrainConfig(dataset=self.dataset, lr=self.lr, batch_size=self.batch_size, workers=1, data_root=self.data_root)


@dataclass(frozen=True)
class Result:
    accuracy: float
    """The final global model's test accuracy (last exit)."""
    records: list[RoundRecord]
    bytes_up: int
    bytes_down: int
    histogram: list[list[int]]
    placement: list[dict]
    seconds: float
    model: str | None = None
    """The registered (calibrated) ref, if registered."""

    def summary(self) -> str:
        dropped = sum(len(r.dropped) for r in self.records)
        skipped = sum(r.skipped for r in self.records)
        lines = [f"FedAvg over {len(self.histogram)} clients, {len(self.records)} rounds in {self.seconds:.0f}s: test accuracy {self.accuracy:.4f}",
                 f"  bytes: {self.bytes_up / 1e6:.2f} MB of updates up, {self.bytes_down / 1e6:.2f} MB of weights down; {dropped} drop-out(s), {skipped} round(s) skipped",
                 "  samples per class per client: " + "; ".join(f"c{i} {h}" for i, h in enumerate(self.histogram))]
        if self.model:
            lines.append(f"registered {self.model}")
        return "\n".join(lines)


def run(cfg: Config) -> Result:
    connect()
    t0 = time.perf_counter()
    test = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    model_cfg = default_model_config(cfg.dataset)
    drop = DropPlan(client=cfg.drop_client, round=cfg.drop_round) if cfg.drop_client is not None else None
    fed = run_federated(cfg.fed, dataset=cfg.dataset, model=model_cfg, recipe=cfg.recipe(), test=test, tier=cfg.tier, cpus_per_client=cfg.cpus_per_client,
                        round_timeout_s=cfg.round_timeout_s, drop=drop, data_root=cfg.data_root)
    acc = next((r.accuracy for r in reversed(fed.records) if r.accuracy is not None), float("nan"))
    ref = None
    if cfg.register:
        registry = job_registry()
        val = load_dataset(cfg.dataset, "val", root=cfg.data_root)
        rec = collect_exit_outputs(fed.model, val.images, val.labels)
        summary = {"fed": dataclasses.asdict(cfg.fed), "rounds": [r.to_dict() for r in fed.records], "histogram": fed.histogram, "lr": cfg.lr}
        info = save_model(registry, f"fedavg-{cfg.dataset}", fed.model, dataset=cfg.dataset, rule=ThresholdRule(thresholds=(0.9,) * (fed.model.num_exits - 1)),
                          metrics={"val_exit_accuracy": rec.exit_accuracy(), "val_accuracy_full": rec.exit_accuracy()[-1], "test_accuracy_full": acc},
                          extra={"federated": summary, "thresholds_source": "training default (uncalibrated)"})
        ref = calibrate_and_register(registry, info.ref, CalibrationTarget(max_drop=cfg.max_drop), data_root=cfg.data_root)[0].ref
    return Result(acc, fed.records, fed.bytes_up, fed.bytes_down, fed.histogram, fed.placement, time.perf_counter() - t0, ref)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.federated") -> int:
    print(run(parse(Config, argv, prog=prog, description=__doc__)).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.federated"))
