"""Ray job: edge compression of a registered model; merges the "compress" section of the bench JSON.

    python -m jobs.bench_compress --dataset mnist-5k --json out/bench.json
    dynray bench compress --dataset mnist-5k --json out/bench.json

Self-contained after `make demo`: the parent is the ``production`` model (or ``--model``).
Per seed it builds an int8 variant (calibrated on a seeded subset of train), a 50%-pruned
variant fine-tuned with the parent as teacher, and a distilled student next to the same
student trained from scratch; see :mod:`dynray.bench.compress` for how each is measured.
Nothing is registered (``dynray compress`` registers variants).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.compress import CompressBenchConfig, bench_compress
from dynray.data import load_dataset
from dynray.flags import guarded, parse, setup_logging
from dynray.store import load_model
from dynray.training import TrainConfig
from jobs._ray import job_registry

__all__ = ["Config", "run", "main"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """int8 size/speed/accuracy, 50% channel pruning and distillation vs scratch, over seeds; merge the "compress" section."""

    compress: Annotated[CompressBenchConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=CompressBenchConfig)
    """How the section measures."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""


def run(cfg: Config) -> BenchResult:
    check_bench_file(cfg.json)
    parent = load_model(job_registry(), cfg.model)
    dataset = cfg.dataset or parent.dataset
    train, test = load_dataset(dataset, "train", root=cfg.data_root), load_dataset(dataset, "test", root=cfg.data_root)
    recipe = TrainConfig(dataset=dataset, workers=1, data_root=cfg.data_root)
    log.info("compressing %s: int8, 50%% pruning and a distilled student, %d seeds", parent.info.ref, len(cfg.compress.seeds))
    section = {"model": parent.info.ref, "dataset": dataset, **bench_compress(parent.model, train, test, cfg=cfg.compress, recipe=recipe)}
    merge_section(cfg.json, "compress", section)
    return BenchResult("compress", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_compress") -> int:
    print(run(parse(Config, argv, prog=prog, description=__doc__)).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_compress"))
