"""Measurements of the ``"moe"`` bench section: MoE vs its dense twin, expert usage, remote experts.

Everything here is plain torch: the job (``jobs/bench_moe.py``) finds or trains the two
models, starts the expert actors and passes their runner in.

- **Equal active MACs.** The dense twin (``MoEConfig.dense_equivalent``) has one always-on
  expert with A times the hidden size, so both networks spend the same MACs per sample
  (the MoE adds its gate's few). Accuracy is compared at the last exit (the full network)
  and, for the record, with both models' early exits at one threshold.
- **MACs** are measured on the compacted forward pass and count only the experts that ran
  (dropped assignments cost nothing).
- **Expert usage and drops** are measured at evaluation capacity, in batches of
  ``batch_size`` test samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from dynray.data import Split
from dynray.models import DynamicNet, StopAtExit
from dynray.models.moe import ExpertRunner, MoEUsage
from dynray.thresholds import ThresholdRule

__all__ = ["MoEBenchConfig", "model_quality", "expert_usage", "remote_equality", "remote_latency"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MoEBenchConfig:
    """How the MoE section measures."""

    batch_size: int = 256
    """Test samples per forward for usage, drops and MACs (capacity is per batch)."""
    threshold: float = 0.9
    """Max-softmax threshold of the adaptive comparison (both models, every early exit)."""
    latency_calls: int = 60
    """Timed calls per path and batch size for the remote-expert overhead."""
    latency_batches: tuple[int, ...] = (1, 64)
    """Batch sizes of the latency comparison."""


def _batches(x: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]


@torch.no_grad()
def model_quality(model: DynamicNet, test: Split, cfg: MoEBenchConfig) -> dict:
    """Full-network and adaptive accuracy, with the measured MACs per sample of each."""
    model.eval()
    full_logits, full_macs, ad_logits, ad_macs, ad_exit = [], [], [], [], []
    rule = ThresholdRule(thresholds=(cfg.threshold,) * (model.num_exits - 1))
    for xb in _batches(test.images, cfg.batch_size):
        f = model.forward_exits(xb, StopAtExit(-1))
        a = model.forward_exits(xb, rule)
        full_logits.append(f.logits)
        full_macs.append(f.macs)
        ad_logits.append(a.logits)
        ad_macs.append(a.macs)
        ad_exit.append(a.exit_index)
    y = test.labels

    def acc(parts: list[torch.Tensor]) -> float:
        return float((torch.cat(parts).argmax(1) == y).float().mean())

    exits = torch.cat(ad_exit)
    return {
        "accuracy": acc(full_logits),
        "active_macs": float(torch.cat(full_macs).double().mean()),
        "profile_macs": model.mac_profile.cumulative[-1],
        "adaptive": {
            "threshold": cfg.threshold,
            "accuracy": acc(ad_logits),
            "active_macs": float(torch.cat(ad_macs).double().mean()),
            "exit_fractions": (torch.bincount(exits, minlength=model.num_exits).double() / len(exits)).tolist(),
        },
    }


@torch.no_grad()
def expert_usage(model: DynamicNet, test: Split, cfg: MoEBenchConfig) -> dict:
    """Per-expert share of the assignments and the dropped share, over the test split."""
    model.eval()
    usage = MoEUsage()
    for xb in _batches(test.images, cfg.batch_size):
        model(xb)
        usage.add(model.moe_outputs())
    return {**usage.summary(), "batch_size": cfg.batch_size}


@torch.no_grad()
def remote_equality(local: DynamicNet, remote: DynamicNet, test: Split, cfg: MoEBenchConfig) -> dict:
    """Largest |logit| difference between local experts and ``remote``'s runner, full network."""
    diff, rerouted = 0.0, 0
    for xb in _batches(test.images, cfg.batch_size):
        a = local.forward_exits(xb, StopAtExit(-1))
        b = remote.forward_exits(xb, StopAtExit(-1))
        diff = max(diff, float((a.logits - b.logits).abs().max()))
        rerouted += int(b.rerouted.sum()) if b.rerouted is not None else 0
    return {"max_abs_diff": diff, "rerouted": rerouted, "samples": len(test)}


def _p(ms: list[float], q: float) -> float:
    return round(float(np.percentile(ms, q)), 3)


@torch.no_grad()
def remote_latency(model: DynamicNet, runner: ExpertRunner, test: Split, cfg: MoEBenchConfig) -> dict:
    """Full-network forward time with local experts vs ``runner``, alternating call by call
    on the same inputs (so drifts of a shared machine cancel), per batch size."""
    model.eval()
    out: dict = {}
    for b in cfg.latency_batches:
        xs = [test.images[(i * b) % (len(test) - b) :][:b] for i in range(cfg.latency_calls)]
        times: dict[str, list[float]] = {"local": [], "remote": []}
        for i, x in enumerate([xs[0]] * 5 + xs):  # 5 warm-up calls
            for path in ("local", "remote"):
                model.set_expert_runner(runner if path == "remote" else None)
                t0 = time.perf_counter()
                model.forward_exits(x, StopAtExit(-1))
                if i >= 5:
                    times[path].append((time.perf_counter() - t0) * 1000)
        model.set_expert_runner(None)
        out[f"b{b}"] = {p: {"p50": _p(t, 50), "p99": _p(t, 99)} for p, t in times.items()}
        out[f"b{b}"]["overhead_p50_ms"] = round(out[f"b{b}"]["remote"]["p50"] - out[f"b{b}"]["local"]["p50"], 3)
    return out
