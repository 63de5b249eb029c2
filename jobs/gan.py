"""Ray job: train a class-conditional GAN on a dataset and register its generator.

    python -m jobs.gan --dataset mnist-5k
    python -m jobs.gan --dataset mnist-5k --fraction 0.1 --seed 0    # the low-data setting
    dynray gan --dataset mnist-5k
    dynray submit gan -- --dataset mnist-5k

The generator is registered as ``cgan-DATASET`` (a new version each run). Its samples are a
PNG grid (one row per class) under ``$DYNRAY_HOME/gan/``, and their quality is checked: the
accuracy a classifier trained on the real data (``--judge``, default the dataset's production
model) gets on them. ``dynray train --synthetic N`` samples it to augment training.
See :mod:`dynray.gan` for the networks and the recipe.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dynray.data import load_dataset, subsample
from dynray.errors import RegistryError, UnknownNameError
from dynray.flags import guarded, parse, setup_logging
from dynray.gan import GANConfig, gan_name, label_accuracy, save_generator, save_grid, train_cgan
from dynray.registry import default_home
from dynray.store import StoredModel, load_model
from jobs._ray import job_registry

__all__ = ["Config", "Result", "run", "main"]
log = logging.getLogger(__name__)
_G = GANConfig()  # defaults come from the library's config


@dataclass(frozen=True, kw_only=True)
class Config:
    """Train a class-conditional GAN on a dataset and register its generator."""

    dataset: str = "mnist-5k"
    """Dataset name."""
    fraction: float = 1.0
    """Share of each class of the training split to train on, picked by --seed (the same pick as `dynray train --train-fraction`)."""
    steps: int = _G.steps
    """Discriminator/generator update pairs."""
    width: int = _G.width
    """Channels of the generator's last block and the discriminator's first convolution."""
    latent: int = _G.latent
    """Noise dimensions."""
    batch_size: int = _G.batch_size
    """Real (and fake) images per step."""
    lr: float = _G.lr
    """Adam learning rate of both networks."""
    ac_weight: float = _G.ac_weight
    """Weight of the auxiliary-classifier loss (0 disables it)."""
    mode_seeking: float = _G.mode_seeking
    """Weight of the mode-seeking term against collapse (0 disables it)."""
    ema: float = _G.ema
    """Decay of the generator's weight average that samples come from."""
    seed: int = _G.seed
    """Seeds the subset, the weights, the noise and the batches."""
    name: str | None = None
    """Registry name (default: cgan-DATASET)."""
    judge: str | None = None
    """Classifier for the quality check, trained on the real data (default: the production model if it is of this dataset, else the newest dynnet-DATASET; none: skipped)."""
    check_samples: int = 1000
    """Samples the quality check classifies."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""

    def gan_config(self, input_shape: tuple[int, int, int], num_classes: int) -> GANConfig:
        """The library's GANConfig (validated there: errors name the fix)."""
        return GANConfig(input_shape=input_shape, num_classes=num_classes, latent=self.latent, width=self.width, steps=self.steps, batch_size=self.batch_size,
                         lr=self.lr, ac_weight=self.ac_weight, mode_seeking=self.mode_seeking, ema=self.ema, seed=self.seed)


@dataclass(frozen=True)
class Result:
    generator: str
    """The registered ref, cgan-DATASET:vN."""
    train_images: int
    """Real images it was trained on."""
    seconds: float
    """GAN training wall-clock time."""
    grid: str
    """The sample grid PNG."""
    sample_accuracy: float | None
    """The judge's accuracy on the samples (None: no judge)."""
    judge: str | None

    def summary(self) -> str:
        check = (f"a classifier trained on the real data ({self.judge}) labels {100 * self.sample_accuracy:.1f}% of its samples as their class"
                 if self.sample_accuracy is not None else "quality check skipped: no classifier of this dataset is registered (train one: dynray train)")
        return f"registered {self.generator}: trained on {self.train_images} real images in {self.seconds:.0f}s; {check}\nsample grid: {self.grid}"


def _judge(cfg: Config) -> StoredModel | None:
    registry = job_registry()
    if cfg.judge is not None:
        return load_model(registry, cfg.judge)  # an explicit judge that is missing is an error
    for ref in ("production", f"dynnet-{cfg.dataset}"):
        try:
            stored = load_model(registry, ref)
        except (RegistryError, UnknownNameError):
            continue
        if stored.dataset == cfg.dataset:
            return stored
    return None


def run(cfg: Config) -> Result:
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    gcfg = cfg.gan_config(train.input_shape, train.num_classes)  # bad input fails here, before training
    real = subsample(train, cfg.fraction, seed=cfg.seed)
    judge = _judge(cfg)
    log.info("training a cGAN on %d real images of %s (%d steps)", len(real), cfg.dataset, gcfg.steps)
    t0 = time.perf_counter()
    g = train_cgan(real, gcfg, log_every=max(1, gcfg.steps // 10))
    seconds = time.perf_counter() - t0
    acc = label_accuracy(judge.model.forward_full, g, cfg.check_samples, seed=cfg.seed + 1) if judge is not None else None
    registry = job_registry()
    info = save_generator(registry, cfg.name or gan_name(cfg.dataset), g, dataset=cfg.dataset,
                          extra={"fraction": cfg.fraction, "train_images": len(real), "train_seconds": seconds,
                                 "quality": {"sample_accuracy": acc, "judge": judge.info.ref if judge else None, "samples": cfg.check_samples},
                                 "job_config": asdict(cfg)})
    grid = save_grid(g, Path(default_home()) / "gan" / f"{info.name}-v{info.version}.png", seed=cfg.seed)
    return Result(generator=info.ref, train_images=len(real), seconds=seconds, grid=grid, sample_accuracy=acc, judge=judge.info.ref if judge else None)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.gan") -> int:
    print(run(parse(Config, argv, prog=prog, description=__doc__)).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.gan"))
