"""Measurements of the ``"gan"`` bench section: does cGAN augmentation help a small training set?

Per seed (``jobs/bench_gan.py`` runs the seeds as Ray tasks, one CPU each):

1. ``fraction`` of each class of the training split is the *real* set (``dynray.data.subsample``).
2. A class-conditional GAN (:mod:`dynray.gan`) trains on the real set only.
3. **Quality check**: the accuracy that a classifier trained on all the real data (the
   registered model, the *judge*) gets on ``check_samples`` balanced samples; and a copy
   check: the median pixel-L2 distance from a sample to the nearest real image of its class,
   next to the same distance for as many held-out real images (copies would sit closer).
4. **Baseline**: the default DynamicNet trained on the real set alone for ``epochs`` (the
   project's recipe, with its random-affine augmentation).
5. **Augmented**: the same model, init and recipe, trained on the real set (repeated
   ``real_repeats`` times) plus ``synthetic`` samples, for the *same number of optimiser
   steps* as the baseline, so neither gets more updates.
6. **Ceiling**: the same again with ``synthetic`` *real* images of the rest of the training
   split in place of the samples: what perfect samples could give at most.

The classifiers are scored on the whole test split (last exit). The target: the augmented
model is >= 1 pt more accurate than the baseline, in every seed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dynray.data import Split, subsample, subsample_indices
from dynray.errors import ConfigError
from dynray.evaluation import full_accuracy
from dynray.gan import GANConfig, Generator, label_accuracy, sample, synthetic_split, train_cgan
from dynray.models.build import build
from dynray.training import TrainConfig, train_local

__all__ = ["GanBenchConfig", "gan_seed", "nearest_distance", "summarize", "format_gan"]
log = logging.getLogger(__name__)
_G = GANConfig()


@dataclass(frozen=True, kw_only=True)
class GanBenchConfig:
    """How the gan section measures."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One real subset, GAN and classifier pair per seed."""
    fraction: float = 0.1
    """Share of each class of the training split that is real."""
    gan_steps: int = _G.steps
    """GAN update pairs."""
    gan_width: int = _G.width
    """GAN width."""
    synthetic: int = 3150
    """cGAN samples added to the real set (balanced over the classes)."""
    real_repeats: int = 9
    """Copies of the real set in the augmented training set (sets the real share of each batch)."""
    epochs: int = 100
    """Baseline epochs over the real set; the augmented run gets the same optimiser steps."""
    check_samples: int = 1000
    """Samples the quality check classifies."""

    def __post_init__(self) -> None:
        if not self.seeds or min(self.gan_steps, self.gan_width, self.epochs, self.check_samples, self.real_repeats) < 1 or self.synthetic < 0:
            raise ConfigError("the gan bench needs a seed, GAN steps and width, epochs, check samples and real repeats >= 1, and synthetic >= 0",
                              got={"seeds": self.seeds, "gan_steps": self.gan_steps, "epochs": self.epochs, "synthetic": self.synthetic, "real_repeats": self.real_repeats},
                              fix="e.g. --seeds 0 1 2 --gan-steps 4000 --synthetic 3150")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError("the real fraction must lie in (0, 1)", got=self.fraction, fix="e.g. --fraction 0.1")


def _classifier(real: Split, data: Split, recipe: TrainConfig, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build(recipe.model_config())
    net.complexity.fit(real.images)
    return train_local(net, data, dataclasses.replace(recipe, epochs=epochs, seed=seed, workers=1))


def gan_seed(seed: int, train: Split, test: Split, judge: Callable[[torch.Tensor], torch.Tensor] | None, cfg: GanBenchConfig, recipe: TrainConfig) -> tuple[dict, Generator]:
    """One seed's row of the section, and its generator (for the sample grid)."""
    torch.set_num_threads(1)
    real = subsample(train, cfg.fraction, seed=seed)
    t0 = time.perf_counter()
    g = train_cgan(real, GANConfig(input_shape=real.input_shape, num_classes=real.num_classes, steps=cfg.gan_steps, width=cfg.gan_width, seed=seed),
                   log_every=max(1, cfg.gan_steps // 4))
    gan_s = time.perf_counter() - t0
    quality = label_accuracy(judge, g, cfg.check_samples, seed=seed + 1) if judge is not None else None
    baseline = full_accuracy(_classifier(real, real, recipe, cfg.epochs, seed), test)
    steps = cfg.epochs * (len(real) // recipe.batch_size)

    def with_extra(extra: Split) -> tuple[float, int]:  # the real set repeated, plus extra images, for the baseline's steps
        mixed = dataclasses.replace(real, images=torch.cat([real.images.repeat(cfg.real_repeats, 1, 1, 1), extra.images]),
                                    labels=torch.cat([real.labels.repeat(cfg.real_repeats), extra.labels]))
        epochs = max(1, round(steps / max(1, len(mixed) // recipe.batch_size)))
        return full_accuracy(_classifier(real, mixed, recipe, epochs, seed), test), epochs

    augmented, mixed_epochs = with_extra(synthetic_split(g, cfg.synthetic, dataset=real.name, seed=seed + 2))
    rest = _rest(train, cfg.fraction, cfg.synthetic, seed)
    ceiling, _ = with_extra(rest)
    x, y = sample(g, cfg.check_samples, seed=seed + 1)
    nn_syn, nn_real = nearest_distance(x, y, real), nearest_distance(rest.images[: cfg.check_samples], rest.labels[: cfg.check_samples], real)
    log.info("gan (seed %d): %d real images; samples labelled right %s; real alone %.4f, + %d synthetic %.4f (%+.1f pt), + %d more real %.4f (%+.1f pt)", seed, len(real),
             "-" if quality is None else f"{100 * quality:.1f}%", baseline, cfg.synthetic, augmented, 100 * (augmented - baseline), len(rest), ceiling, 100 * (ceiling - baseline))
    row = {"seed": seed, "real_images": len(real), "synthetic_images": cfg.synthetic, "sample_accuracy": quality, "accuracy_real": baseline,
           "accuracy_augmented": augmented, "gain": augmented - baseline, "accuracy_more_real": ceiling, "more_real_images": len(rest),
           "nn_distance_synthetic": nn_syn, "nn_distance_heldout_real": nn_real,
           "gan_seconds": gan_s, "epochs_real": cfg.epochs, "epochs_augmented": mixed_epochs}
    return row, g


def nearest_distance(x: torch.Tensor, y: torch.Tensor, real: Split) -> float:
    """Median over ``x`` of the pixel-L2 distance to the nearest image of ``real`` with the same label."""
    d = torch.cdist(x.flatten(1).float(), real.images.flatten(1))  # [n, m]
    d[y[:, None] != real.labels[None, :]] = float("inf")
    return float(d.min(1).values.median())


def _rest(train: Split, fraction: float, n: int, seed: int) -> Split:
    """``n`` training images outside the real set (fewer if the split has fewer), picked by ``seed``."""
    left = torch.ones(len(train), dtype=torch.bool)
    left[subsample_indices(train.labels, fraction, seed=seed)] = False
    ids = torch.nonzero(left).flatten()
    pick = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n]]
    return dataclasses.replace(train, images=train.images[pick], labels=train.labels[pick])


def summarize(rows: list[dict], *, config: dict, judge: str | None, grid: str | None) -> dict:
    """The section: the contract's two fields (seed means), the worst gain, and every seed."""
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    quality = [r["sample_accuracy"] for r in rows if r["sample_accuracy"] is not None]
    return {
        "accuracy_10pct_real": mean("accuracy_real"),
        "accuracy_10pct_plus_synthetic": mean("accuracy_augmented"),
        "worst_gain": min(r["gain"] for r in rows),
        "accuracy_10pct_plus_more_real": mean("accuracy_more_real"),
        "nn_distance_synthetic": mean("nn_distance_synthetic"),
        "nn_distance_heldout_real": mean("nn_distance_heldout_real"),
        "sample_accuracy": sum(quality) / len(quality) if quality else None,
        "judge": judge,
        "grid": grid,
        "seeds": [r["seed"] for r in rows],
        "per_seed": rows,
        "config": config,
        "targets_met": {"augmentation_gains_1pt": sum(r["gain"] >= 0.01 for r in rows), "of": len(rows)},
    }


def format_gan(s: dict) -> str:
    n = len(s["seeds"])
    q = "-" if s["sample_accuracy"] is None else f"{100 * s['sample_accuracy']:.1f}%"
    lines = [
        f"cGAN samples labelled as their class by {s['judge'] or 'no judge'}: {q} (mean of {n} seeds); grid {s['grid']}",
        f"{100 * s['config']['fraction']:.0f}% real alone {s['accuracy_10pct_real']:.4f}, plus synthetic {s['accuracy_10pct_plus_synthetic']:.4f} (means); "
        f"gain >= 1 pt in {s['targets_met']['augmentation_gains_1pt']} of {n} seeds: " + ", ".join(f"{r['accuracy_real']:.4f} -> {r['accuracy_augmented']:.4f}" for r in s["per_seed"]),
        f"median distance to the nearest real image of the class: samples {s['nn_distance_synthetic']:.2f}, held-out real images {s['nn_distance_heldout_real']:.2f} (copies would be closer)",
        f"ceiling, as many more real images instead of samples: {s['accuracy_10pct_plus_more_real']:.4f} (mean): "
        + ", ".join(f"{r['accuracy_more_real']:.4f}" for r in s["per_seed"]),
    ]
    return "\n".join(lines)
