"""Edge variants of a registered model: build, measure, calibrate and register them as children.

One function per method builds the variant from the parent (:func:`int8_variant`,
:func:`pruned_variant`, :func:`distilled_variant`); :func:`measure` takes its size (the bytes
the registry stores), its CPU latency and its test accuracy;
:func:`dynray.compress.register.register_variant` calibrates its thresholds and registers it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import save as safetensors_bytes

from dynray.compress.distill import Distillation, student_config
from dynray.compress.prune import prune_channels
from dynray.compress.quant import int8_state, is_int8, quantize_int8
from dynray.data import Split
from dynray.evaluation import full_accuracy
from dynray.models.build import build
from dynray.models.dynamic import DynamicNet
from dynray.training import TrainConfig, train_local

__all__ = ["VariantStats", "measure", "size_bytes", "int8_variant", "pruned_variant", "distilled_variant", "student_from_scratch"]

EpochHook = Callable[[int, dict], None]


@dataclass(frozen=True)
class VariantStats:
    """What a variant costs and keeps."""

    size_bytes: int  # the weights as the registry stores them (safetensors)
    latency_ms_b256: float  # median time of a batch of 256 through the full network, one thread
    latency_ms_b1: float  # median time of one sample through the full network, one thread
    accuracy: float  # full-network (last exit) accuracy on the split measured on
    macs_full: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def size_bytes(model: DynamicNet) -> int:
    """Bytes of the weights as the registry stores them."""
    state = int8_state(model) if is_int8(model) else {k: v.contiguous() for k, v in model.state_dict().items()}
    return len(safetensors_bytes(state))


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * sorted(times)[len(times) // 2]


@torch.no_grad()
def measure(model: DynamicNet, test: Split, *, reps: int = 30, threads: int = 1) -> VariantStats:
    """Size, one-thread CPU latency (batch 256 and 1) and test accuracy of the full network."""
    acc = full_accuracy(model, test)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x256, x1 = test.images[:256], test.images[:1]
        b256 = _median_ms(lambda: model.forward_full(x256), reps)
        b1 = _median_ms(lambda: model.forward_full(x1), reps * 5)
    finally:
        torch.set_num_threads(prev)
    return VariantStats(size_bytes=size_bytes(model), latency_ms_b256=b256, latency_ms_b1=b1, accuracy=acc, macs_full=int(model.mac_profile.full))


def int8_variant(parent: DynamicNet, calib: torch.Tensor, *, engine: str = "x86") -> DynamicNet:
    """Static int8 convolutions (calibrated on ``calib``) and dynamic int8 linear layers."""
    return quantize_int8(parent, calib, engine=engine)


def pruned_variant(parent: DynamicNet, train: Split, recipe: TrainConfig, *, ratio: float = 0.5, distill_alpha: float = 0.7, on_epoch: EpochHook | None = None) -> DynamicNet:
    """Remove ``ratio`` of every conv's channels, then fine-tune with ``recipe`` (distilling
    the unpruned parent into the pruned net unless ``distill_alpha`` is 0)."""
    small = prune_channels(parent, ratio).train()
    kd = Distillation(teacher=parent, alpha=distill_alpha) if distill_alpha else None
    return train_local(small, train, dataclasses.replace(recipe, model=small.cfg), extra_loss=kd, on_epoch=on_epoch)


def _student(parent: DynamicNet, width_mult: float, seed: int) -> DynamicNet:
    torch.manual_seed(seed)
    s = build(student_config(parent.cfg, width_mult))
    s.complexity.load_state_dict(parent.complexity.state_dict())
    return s


def distilled_variant(parent: DynamicNet, train: Split, recipe: TrainConfig, *, width_mult: float = 0.5, alpha: float = 0.7, temperature: float = 4.0, last_exit_only: bool = False,
                      on_epoch: EpochHook | None = None) -> DynamicNet:
    """A student ``width_mult`` as wide as the parent, trained with ``recipe`` to match the parent."""
    s = _student(parent, width_mult, recipe.seed)
    kd = Distillation(teacher=parent, alpha=alpha, temperature=temperature, last_exit_only=last_exit_only)
    return train_local(s, train, dataclasses.replace(recipe, model=s.cfg), extra_loss=kd, on_epoch=on_epoch)


def student_from_scratch(parent: DynamicNet, train: Split, recipe: TrainConfig, *, width_mult: float = 0.5, on_epoch: EpochHook | None = None) -> DynamicNet:
    """The same student, same init and recipe, without the teacher: the baseline distillation must beat."""
    s = _student(parent, width_mult, recipe.seed)
    return train_local(s, train, dataclasses.replace(recipe, model=s.cfg), on_epoch=on_epoch)
