"""Ray job: build an edge variant of a registered model and register it as a child version.

    python -m jobs.compress int8 --model production
    python -m jobs.compress prune --model production --ratio 0.5
    python -m jobs.compress distill --model production --student-width 0.5
    dynray compress int8|prune|distill [flags]

``int8``: static int8 convolutions calibrated on training images, dynamic int8 linear layers
(``torch.ao.quantization``). ``prune``: remove a share of every conv's channels by their
BN-folded L1 norm, then fine-tune while distilling the parent. ``distill``: train a narrower
student to match the parent. Each variant gets its thresholds calibrated to the parent's
target on val and is registered as ``<parent name>-<method>`` (parent = the parent's ref),
with its size, one-thread CPU latency and test accuracy next to the parent's in its meta.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from typing import Annotated, Literal, Union

import tyro

from dynray.compress.register import register_variant
from dynray.compress.variants import VariantStats, distilled_variant, int8_variant, measure, pruned_variant
from dynray.data import load_dataset
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.store import load_model
from dynray.training import TrainConfig
from jobs._ray import job_registry

__all__ = ["Int8Config", "PruneConfig", "DistillConfig", "Config", "Result", "run", "main"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class _Common:
    model: str | None = None
    """Parent model ref (name, name:vN, production, staging); default: production, else the newest."""
    seed: int = 0
    """Seeds the calibration subset, the student's init and the data order."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""


@dataclass(frozen=True, kw_only=True)
class Int8Config(_Common):
    """int8: static int8 convolutions (calibrated) and dynamic int8 linear layers."""

    calib_samples: int = 512
    """Training images the activation ranges are observed on."""
    engine: Literal["x86", "fbgemm", "qnnpack"] = "x86"
    """torch quantised-kernel backend (x86 and fbgemm on Intel/AMD CPUs, qnnpack on ARM)."""

    def __post_init__(self) -> None:
        if self.calib_samples < 1:
            raise ConfigError("the calibration set is empty", got=self.calib_samples, fix="pass --calib-samples 512 (training images to observe the activation ranges on)")


@dataclass(frozen=True, kw_only=True)
class PruneConfig(_Common):
    """prune: structured channel pruning, then fine-tuning with the parent as teacher."""

    ratio: float = 0.5
    """Share of every convolution's output channels to remove."""
    epochs: int = 12
    """Fine-tuning epochs after pruning."""
    lr: float = 2e-3
    """Peak fine-tuning learning rate."""
    distill_alpha: float = 0.7
    """Share of the fine-tuning loss from the unpruned parent's answers (0 = labels only)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError("the pruning ratio must be in (0, 1)", got=self.ratio, fix="e.g. --ratio 0.5")
        if self.epochs < 1:
            raise ConfigError("fine-tuning needs at least one epoch", got=self.epochs, fix="e.g. --epochs 12")


@dataclass(frozen=True, kw_only=True)
class DistillConfig(_Common):
    """distill: a narrower student trained to match the parent (knowledge distillation)."""

    student_width: float = 0.5
    """Student stage widths as a share of the parent's."""
    epochs: int = 20
    """Student training epochs."""
    alpha: float = 0.7
    """Share of the loss from the teacher's softened answers."""
    temperature: float = 4.0
    """Distillation temperature."""
    last_exit_only: bool = False
    """Distil into the student's last exit only (its early exits self-distil from it); default: every exit."""

    def __post_init__(self) -> None:
        if not 0.0 < self.student_width <= 1.0:
            raise ConfigError("the student width must be in (0, 1]", got=self.student_width, fix="e.g. --student-width 0.5")
        if self.epochs < 1:
            raise ConfigError("the student needs at least one epoch", got=self.epochs, fix="e.g. --epochs 20")


Config = Union[  # noqa: UP007 - tyro reads the subcommands from a typing.Union
    Annotated[Int8Config, tyro.conf.subcommand("int8")],
    Annotated[PruneConfig, tyro.conf.subcommand("prune")],
    Annotated[DistillConfig, tyro.conf.subcommand("distill")],
]
"""One config per method; the method name on the command line picks it."""

_METHOD = {Int8Config: "int8", PruneConfig: "pruned", DistillConfig: "distilled"}


@dataclass(frozen=True)
class Result:
    model: str
    """The registered variant."""
    parent: str
    method: str
    parent_stats: VariantStats
    stats: VariantStats

    def summary(self) -> str:
        p, s = self.parent_stats, self.stats
        return "\n".join([
            f"registered {self.model} ({self.method} variant of {self.parent})",
            f"  {'':10} {'size':>10} {'b256 ms':>9} {'b1 ms':>7} {'MACs':>11} {'accuracy':>9}",
            f"  {'parent':10} {p.size_bytes / 1024:>8.1f}kB {p.latency_ms_b256:>9.2f} {p.latency_ms_b1:>7.3f} {p.macs_full:>11,} {p.accuracy:>9.4f}",
            f"  {self.method:10} {s.size_bytes / 1024:>8.1f}kB {s.latency_ms_b256:>9.2f} {s.latency_ms_b1:>7.3f} {s.macs_full:>11,} {s.accuracy:>9.4f}",
            f"  {p.size_bytes / s.size_bytes:.2f}x smaller, {p.latency_ms_b256 / s.latency_ms_b256:.2f}x faster at batch 256 (one thread), "
            f"accuracy {100 * (s.accuracy - p.accuracy):+.1f} pt on the test split",
        ])


def _log_epoch(epochs: int):
    def hook(epoch: int, stats: dict) -> None:
        log.info("epoch %d/%d  loss(last exit) %.3f", epoch + 1, epochs, stats["loss_per_exit"][-1])

    return hook


def run(cfg: Int8Config | PruneConfig | DistillConfig) -> Result:
    registry = job_registry()
    parent = load_model(registry, cfg.model)
    train = load_dataset(parent.dataset, "train", root=cfg.data_root)
    val = load_dataset(parent.dataset, "val", root=cfg.data_root)
    test = load_dataset(parent.dataset, "test", root=cfg.data_root)
    recipe = TrainConfig(dataset=parent.dataset, workers=1, seed=cfg.seed, data_root=cfg.data_root)
    details: dict = {}
    if isinstance(cfg, Int8Config):
        import torch

        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.calib_samples]
        model = int8_variant(parent.model, train.images[idx], engine=cfg.engine)
        details = {"calib_samples": int(idx.numel()), "engine": cfg.engine}
    elif isinstance(cfg, PruneConfig):
        log.info("pruning %.0f%% of every conv's channels of %s, then %d fine-tuning epochs", 100 * cfg.ratio, parent.info.ref, cfg.epochs)
        model = pruned_variant(parent.model, train, replace(recipe, epochs=cfg.epochs, lr=cfg.lr), ratio=cfg.ratio, distill_alpha=cfg.distill_alpha, on_epoch=_log_epoch(cfg.epochs))
        details = {"ratio": cfg.ratio, "epochs": cfg.epochs, "distill_alpha": cfg.distill_alpha}
    else:
        log.info("distilling %s into a student %.2fx as wide, %d epochs", parent.info.ref, cfg.student_width, cfg.epochs)
        model = distilled_variant(parent.model, train, replace(recipe, epochs=cfg.epochs), width_mult=cfg.student_width, alpha=cfg.alpha, temperature=cfg.temperature,
                                  last_exit_only=cfg.last_exit_only, on_epoch=_log_epoch(cfg.epochs))
        details = {"student_width": cfg.student_width, "epochs": cfg.epochs, "alpha": cfg.alpha, "temperature": cfg.temperature, "last_exit_only": cfg.last_exit_only}
    parent_stats, stats = measure(parent.model, test), measure(model, test)
    details["parent_stats"] = parent_stats.to_dict()
    info = register_variant(registry, parent, model, method=_METHOD[type(cfg)], val=val, stats=stats, details=details)
    return Result(model=info.ref, parent=parent.info.ref, method=_METHOD[type(cfg)], parent_stats=parent_stats, stats=stats)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.compress") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)  # type: ignore[arg-type]
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.compress"))
