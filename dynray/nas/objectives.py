"""What a search trial measures: adaptive accuracy, adaptive MACs and latency.

"Adaptive" means the network as dynray serves it: thresholds calibrated on the val split to
the same target the demo uses (``--max-drop 0.002``), then applied with batch compaction.
The search selects on val; test numbers are measured at every report too, but only for the
report (the front is chosen on val and shown on test).

Two objectives are kept apart (the Pareto front); ASHA and the evolutionary tournament need
one number, so they rank by ``score = accuracy − mac_weight · log2(MACs / mac_ref)``: one
point of accuracy is worth halving the MACs at the default weight 0.01.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from dynray.data import Split
from dynray.errors import ConfigError
from dynray.evaluation import collect_exit_outputs, simulate
from dynray.models import DynamicNet
from dynray.thresholds import CalibrationTarget, ThresholdRule, calibrate

__all__ = ["ObjectiveConfig", "Measurement", "measure", "score"]


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """How trials are measured and ranked."""

    max_drop: float = 0.002
    """Calibration target on val: at most this share of the last exit's correct answers lost
    (the demo's ``dynray calibrate --max-drop 0.002``)."""
    mac_weight: float = 0.01
    """Accuracy traded per doubling of adaptive MACs in the scalar ``score``."""
    mac_ref: float = 1e5
    """MACs at which the score's MAC term is 0 (only shifts the score)."""
    latency_batch: int = 256
    """Batch size of the adaptive-latency measurement (one thread, as devices run)."""
    latency_repeats: int = 3
    """Timed adaptive passes per report (the median is kept, after one warm-up)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_drop < 1.0:
            raise ConfigError("max_drop must be in [0, 1)", got=self.max_drop, fix="use e.g. 0.002")
        if self.mac_weight < 0 or self.mac_ref <= 0:
            raise ConfigError("mac_weight must be >= 0 and mac_ref > 0", got=(self.mac_weight, self.mac_ref), fix="use e.g. mac_weight=0.01, mac_ref=1e5")
        if self.latency_batch < 1 or self.latency_repeats < 1:
            raise ConfigError("latency_batch and latency_repeats must be >= 1", got=(self.latency_batch, self.latency_repeats), fix="use e.g. 256 and 3")


@dataclass(frozen=True)
class Measurement:
    """One trained network, measured."""

    rule: ThresholdRule
    val_accuracy: float
    val_macs: float
    test_accuracy: float
    test_macs: float
    accuracy_full: float  # val, last exit
    macs_full: float
    latency_ms: float  # adaptive pass, median per batch of ``latency_batch`` val samples

    def metrics(self, cfg: ObjectiveConfig) -> dict[str, float]:
        """The flat dict a trial reports to Tune."""
        return {
            "accuracy": self.val_accuracy,
            "macs": self.val_macs,
            "latency_ms": self.latency_ms,
            "score": score(self.val_accuracy, self.val_macs, cfg),
            "test_accuracy": self.test_accuracy,
            "test_macs": self.test_macs,
            "accuracy_full": self.accuracy_full,
            "macs_full": self.macs_full,
        }


def score(accuracy: float, macs: float, cfg: ObjectiveConfig) -> float:
    """The scalar ranking of ASHA and the tournament (higher is better)."""
    return accuracy - cfg.mac_weight * math.log2(max(macs, 1.0) / cfg.mac_ref)


@torch.no_grad()
def _latency_ms(model: DynamicNet, x: torch.Tensor, rule: ThresholdRule, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.forward_exits(x, rule)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.forward_exits(x, rule)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return float(sorted(times)[len(times) // 2])


def measure(model: DynamicNet, val: Split, test: Split, cfg: ObjectiveConfig) -> Measurement:
    """Calibrate on val, then measure adaptive accuracy and MACs on val and test.

    Calibration tries the confidence measures with no complexity term (the search compares
    architectures, and 3 candidates keep a report under a second).
    """
    model.eval()
    rec = collect_exit_outputs(model, val.images, val.labels)
    res = calibrate(rec, CalibrationTarget(max_drop=cfg.max_drop), complexity_weights=(0.0,), agreement_bonuses=(0.0,), levels=100)
    test_rec = collect_exit_outputs(model, test.images, test.labels)
    on_test = simulate(test_rec, res.rule)
    lat = _latency_ms(model, val.images[: cfg.latency_batch], res.rule, cfg.latency_repeats)
    return Measurement(
        rule=res.rule,
        val_accuracy=res.val.accuracy,
        val_macs=res.val.mean_macs,
        test_accuracy=on_test.accuracy,
        test_macs=on_test.mean_macs,
        accuracy_full=rec.exit_accuracy()[-1],
        macs_full=float(rec.full_macs),
        latency_ms=lat,
    )
