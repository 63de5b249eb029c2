"""Cached per-exit outputs and exact simulation of stop rules on them.

A stop rule decides per sample from that sample's own exit logits and complexity, so
running it on every exit's cached logits gives the same exits as the compacted forward
pass, at a fraction of the cost. Calibration, sensitivity analysis and benchmark sweeps
all use this; a test checks it against :meth:`DynamicNet.forward_exits`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from dynray.data import Split
from dynray.models.dynamic import DynamicNet, StopRule
from dynray.models.moe import MoEOutput

__all__ = ["ExitRecords", "Outcome", "collect_exit_outputs", "full_accuracy", "simulate", "oracle"]


@dataclass(frozen=True)
class ExitRecords:
    """Every exit's logits for every sample of a split, with labels and costs."""

    logits: torch.Tensor  # [K, N, C]
    complexity: torch.Tensor  # [N, F] normalised
    labels: torch.Tensor  # [N]
    cum_macs: torch.Tensor  # [K] cost of leaving at exit k
    full_macs: int  # the plain network's cost per sample

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    @cached_property
    def correct(self) -> torch.Tensor:
        """[K, N] bool: exit k classifies sample n correctly."""
        return self.logits.argmax(dim=2) == self.labels.unsqueeze(0)

    def prev_pred(self, k: int) -> torch.Tensor | None:
        """[N] prediction of exit k-1 (None for the first exit)."""
        return self.logits[k - 1].argmax(dim=1) if k > 0 else None

    def exit_accuracy(self) -> list[float]:
        return self.correct.float().mean(dim=1).tolist()


@dataclass(frozen=True)
class Outcome:
    """What a stop rule achieves on a split."""

    exit_index: torch.Tensor  # [N]
    accuracy: float
    mean_macs: float
    exit_fractions: tuple[float, ...]


@torch.no_grad()
def collect_exit_outputs(
    model: DynamicNet, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 512, on_batch: Callable[[list[MoEOutput]], None] | None = None
) -> ExitRecords:
    """Run every exit on every sample once (eval mode) and cache the results.

    ``on_batch`` receives each batch's MoE block outputs (expert usage statistics).
    """
    model.eval()
    chunks, cx = [], []
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size]
        chunks.append(torch.stack(model(xb)))  # [K, b, C]
        if on_batch is not None:
            on_batch(model.moe_outputs())
        cx.append(model.complexity(xb))
    return ExitRecords(
        logits=torch.cat(chunks, dim=1),
        complexity=torch.cat(cx),
        labels=labels.clone(),
        cum_macs=torch.tensor(model.mac_profile.cumulative, dtype=torch.float64),
        full_macs=model.mac_profile.full,
    )


@torch.no_grad()
def full_accuracy(model: DynamicNet, data: Split, *, batch_size: int = 512) -> float:
    """Accuracy of the full network (the last exit) on ``data``."""
    model.eval()
    pred = torch.cat([model.forward_full(data.images[i : i + batch_size]).argmax(1) for i in range(0, len(data), batch_size)])
    return float((pred == data.labels).float().mean())


def outcome_from_exits(rec: ExitRecords, exit_index: torch.Tensor) -> Outcome:
    """Accuracy, mean MACs and exit mix for a given per-sample exit assignment."""
    n = rec.labels.shape[0]
    correct = rec.correct[exit_index, torch.arange(n)]
    counts = torch.bincount(exit_index, minlength=rec.num_exits).double() / n
    return Outcome(
        exit_index=exit_index,
        accuracy=float(correct.float().mean()),
        mean_macs=float(rec.cum_macs[exit_index].mean()),
        exit_fractions=tuple(counts.tolist()),
    )


def simulate(rec: ExitRecords, rule: StopRule) -> Outcome:
    """Exits a stop rule would choose, from cached outputs (identical to forward_exits)."""
    k_last = rec.num_exits - 1
    stops = [rule.stop(k, rec.logits[k], rec.complexity, rec.prev_pred(k)) for k in range(k_last)]
    stops.append(torch.ones(rec.labels.shape[0], dtype=torch.bool))
    s = torch.stack(stops).to(torch.int8)  # [K, N]
    exit_index = s.argmax(dim=0)  # first exit whose rule says stop
    return outcome_from_exits(rec, exit_index)


def oracle(rec: ExitRecords, *, unsolved: str = "last") -> Outcome:
    """Each sample leaves at the earliest exit that classifies it correctly.

    Samples no exit gets right leave at the last exit (``unsolved="last"``, the usual
    definition, e.g. Kaya et al. 2019) or at the first (``"first"``: the strict lower bound
    on cost at the oracle's accuracy).
    """
    correct = rec.correct  # [K, N]
    any_ok = correct.any(dim=0)
    first_ok = correct.to(torch.int8).argmax(dim=0)
    fallback = rec.num_exits - 1 if unsolved == "last" else 0
    return outcome_from_exits(rec, torch.where(any_ok, first_ok, torch.full_like(first_ok, fallback)))
