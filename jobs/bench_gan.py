"""Ray job: cGAN augmentation of a small training set; merges the "gan" section of the bench JSON.

    python -m jobs.bench_gan --dataset mnist-5k --json out/bench.json
    dynray bench gan --dataset mnist-5k --json out/bench.json

Self-contained after `make demo`: the judge of the samples' quality is the ``production`` model
(or ``--model``), trained on all the real data. Each seed (a Ray task, one CPU) takes 10% of
each class, trains a cGAN on it, and trains the default model on those images alone and on them
plus cGAN samples, with equal optimiser steps; see :mod:`dynray.bench.gan`. The sample grid of
the first seed is written next to the JSON (``--plot`` to move it). Nothing is registered
(``dynray gan`` registers a generator).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import ray
import tyro

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.gan import GanBenchConfig, gan_seed, summarize
from dynray.data import load_dataset
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.gan import save_grid
from dynray.store import load_model
from dynray.training import TrainConfig
from jobs._ray import connect, job_registry

__all__ = ["Config", "run", "main"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """cGAN augmentation with 10% of the real training data against those 10% alone, over seeds; merge the "gan" section."""

    gan: Annotated[GanBenchConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=GanBenchConfig)
    """How the section measures."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""


def _seed_task(*args):
    """One seed in a Ray worker, its progress lines sent to the driver's log."""
    if not logging.getLogger().handlers:
        setup_logging()
    return gan_seed(*args)


def run(cfg: Config) -> BenchResult:
    check_bench_file(cfg.json)
    judge = load_model(job_registry(), cfg.model)
    dataset = cfg.dataset or judge.dataset
    if judge.dataset != dataset:
        raise ConfigError("the judge model was trained on another dataset", got=(judge.info.ref, judge.dataset), fix=f"pass --model with a model of {dataset}, or drop --dataset")
    train, test = load_dataset(dataset, "train", root=cfg.data_root), load_dataset(dataset, "test", root=cfg.data_root)
    recipe = TrainConfig(dataset=dataset, workers=1, data_root=cfg.data_root)
    connect()
    log.info("gan bench on %s: %d seeds, each a Ray task (a cGAN of %d steps, then three classifiers); judge %s", dataset, len(cfg.gan.seeds), cfg.gan.gan_steps, judge.info.ref)
    task = ray.remote(num_cpus=1)(_seed_task)
    refs = [ray.put(x) for x in (train, test, judge.model.forward_full, cfg.gan, recipe)]
    out = ray.get([task.remote(seed, *refs) for seed in cfg.gan.seeds])
    rows = [row for row, _ in out]
    grid = save_grid(out[0][1], cfg.plot or Path(cfg.json).with_name("gan_samples.png"), seed=cfg.gan.seeds[0])
    section = {"dataset": dataset, **summarize(rows, config=dataclasses.asdict(cfg.gan), judge=judge.info.ref, grid=grid)}
    merge_section(cfg.json, "gan", section)
    return BenchResult("gan", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_gan") -> int:
    print(run(parse(Config, argv, prog=prog, description=__doc__)).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_gan"))
