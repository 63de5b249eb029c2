"""Measurements of the ``"compress"`` bench section: int8, 50% channel pruning, distillation.

Plain torch (``jobs/bench_compress.py`` loads the parent and calls :func:`bench_compress`):

- **int8** (:func:`dynray.compress.variants.int8_variant`): size is the bytes the registry
  stores (int8 values, scales, zero points against float32 tensors), speed the median time of
  the full network at batch 256 on one thread against the parent's *BN-folded* float copy
  (what the core bench times; the unfolded net is slower), accuracy on the test split.
  Calibrated on a seeded subset of the training split per seed.
- **pruned50**: half of every conv's channels removed, then fine-tuned (distilling the parent),
  per seed; ``accuracy_drop`` is the worst seed's.
- **distill**: a student ``width`` as wide trained with the parent as teacher, and the same
  student (same init, recipe, data order) from scratch, per seed; ``student``/``scratch`` are the
  seed means and ``wins`` counts the seeds where the distilled student is more accurate.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from dynray.compress.variants import distilled_variant, int8_variant, measure, pruned_variant, student_from_scratch
from dynray.data import Split
from dynray.errors import ConfigError
from dynray.evaluation import full_accuracy
from dynray.models.dynamic import DynamicNet
from dynray.models.fuse import fused_copy
from dynray.training import TrainConfig

__all__ = ["CompressBenchConfig", "bench_compress", "format_compress"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CompressBenchConfig:
    """How the compress section measures."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One calibration subset, pruning fine-tune and student pair per seed."""
    calib_samples: int = 512
    """Training images the int8 activation ranges are observed on."""
    prune_epochs: int = 12
    """Fine-tuning epochs after pruning."""
    prune_lr: float = 2e-3
    """Peak fine-tuning learning rate."""
    student_width: float = 0.5
    """Student stage widths as a share of the parent's."""
    student_epochs: int = 20
    """Epochs of both students (distilled and from scratch)."""
    distill_alpha: float = 0.7
    """Share of the distilled student's loss from the teacher."""
    distill_temperature: float = 4.0
    """Distillation temperature."""
    distill_last_exit_only: bool = False
    """Distil into the student's last exit only (its early exits self-distil from it); default: every exit."""
    latency_reps: int = 30
    """Timed batches per latency figure."""

    def __post_init__(self) -> None:
        if not self.seeds or min(self.calib_samples, self.prune_epochs, self.student_epochs, self.latency_reps) < 1:
            raise ConfigError("the compress bench needs a seed, a calibration set and at least one epoch and timed batch", got={"seeds": self.seeds, "calib_samples": self.calib_samples, "prune_epochs": self.prune_epochs, "student_epochs": self.student_epochs, "latency_reps": self.latency_reps},
                              fix="e.g. --seeds 0 1 2 --calib-samples 512 --prune-epochs 12 --student-epochs 20")


def bench_compress(parent: DynamicNet, train: Split, test: Split, *, cfg: CompressBenchConfig = CompressBenchConfig(), recipe: TrainConfig) -> dict:
    """The ``compress`` section for ``parent`` (its dataset's splits; ``recipe`` the training recipe)."""
    float_ref = measure(fused_copy(parent), test, reps=cfg.latency_reps)
    out: dict = {"n_test": len(test), "parent": float_ref.to_dict(), "seeds": list(cfg.seeds)}
    int8_rows, pruned_rows, distill_rows = [], [], []
    for seed in cfg.seeds:
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: cfg.calib_samples]
        q = measure(int8_variant(parent, train.images[idx]), test, reps=cfg.latency_reps)
        int8_rows.append({"seed": seed, **q.to_dict(), "accuracy_drop": float_ref.accuracy - q.accuracy})
        log.info("int8 (seed %d): %.2fx smaller, %.2fx faster at batch 256, accuracy %.4f", seed, float_ref.size_bytes / q.size_bytes, float_ref.latency_ms_b256 / q.latency_ms_b256, q.accuracy)
        r = dataclasses.replace(recipe, seed=seed)
        p = pruned_variant(parent, train, dataclasses.replace(r, epochs=cfg.prune_epochs, lr=cfg.prune_lr), ratio=0.5)
        acc = full_accuracy(p, test)
        pruned_rows.append({"seed": seed, "accuracy": acc, "accuracy_drop": float_ref.accuracy - acc, "macs_full": int(p.mac_profile.full)})
        log.info("pruned 50%% (seed %d): accuracy %.4f at %d MACs", seed, pruned_rows[-1]["accuracy"], p.mac_profile.full)
        sr = dataclasses.replace(r, epochs=cfg.student_epochs)
        student = full_accuracy(distilled_variant(parent, train, sr, width_mult=cfg.student_width, alpha=cfg.distill_alpha, temperature=cfg.distill_temperature,
                                                   last_exit_only=cfg.distill_last_exit_only), test)
        scratch = full_accuracy(student_from_scratch(parent, train, sr, width_mult=cfg.student_width), test)
        distill_rows.append({"seed": seed, "student": student, "scratch": scratch})
        log.info("distillation (seed %d): student %.4f, same student from scratch %.4f", seed, student, scratch)
    mean = lambda rows, k: sum(row[k] for row in rows) / len(rows)  # noqa: E731
    out["int8"] = {
        "size_ratio": float_ref.size_bytes / mean(int8_rows, "size_bytes"),
        "speedup": float_ref.latency_ms_b256 / mean(int8_rows, "latency_ms_b256"),
        "speedup_b1": float_ref.latency_ms_b1 / mean(int8_rows, "latency_ms_b1"),
        "accuracy_drop": max(row["accuracy_drop"] for row in int8_rows),
        "per_seed": int8_rows,
        "calib_samples": cfg.calib_samples,
    }
    out["pruned50"] = {"accuracy_drop": max(row["accuracy_drop"] for row in pruned_rows), "macs_ratio": float_ref.macs_full / mean(pruned_rows, "macs_full"),
                       "per_seed": pruned_rows, "epochs": cfg.prune_epochs}
    out["distill"] = {"student": mean(distill_rows, "student"), "scratch": mean(distill_rows, "scratch"), "wins": sum(r["student"] > r["scratch"] for r in distill_rows),
                      "per_seed": distill_rows, "student_width": cfg.student_width, "epochs": cfg.student_epochs, "alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature,
                      "last_exit_only": cfg.distill_last_exit_only}
    return out


def format_compress(s: dict) -> str:
    i, p, d = s["int8"], s["pruned50"], s["distill"]
    seeds = len(s["seeds"])
    lines = [
        f"int8: {i['size_ratio']:.2f}x smaller (target >= 2), {i['speedup']:.2f}x faster at batch 256 on one thread (target >= 1.5; {i['speedup_b1']:.2f}x at batch 1), "
        f"worst accuracy drop {100 * i['accuracy_drop']:+.2f} pt (target <= 0.5)",
        f"pruned 50%: {p['macs_ratio']:.2f}x fewer MACs, worst accuracy drop {100 * p['accuracy_drop']:+.2f} pt over {seeds} seeds (target <= 1), "
        f"per seed {[round(r['accuracy'], 4) for r in p['per_seed']]}",
        f"distillation: student {d['student']:.4f} vs from scratch {d['scratch']:.4f} (mean of {seeds}); distilled better in {d['wins']} of {seeds} seeds: "
        + ", ".join(f"{r['student']:.4f}/{r['scratch']:.4f}" for r in d["per_seed"]),
    ]
    return "\n".join(lines)
