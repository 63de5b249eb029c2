"""Ray job: measure one bench section and merge it into the bench JSON file.

    python -m jobs.bench core --json out/bench.json          (core: the adaptive network itself)
    python -m jobs.bench serve|router|moe|nas|cluster|security|drift|compress|gan|federated|calibration --json out/bench.json [section flags]
    dynray bench SECTION --json out/bench.json

Each section is its own job module (``jobs.bench_serve``, ``jobs.bench_router``,
``jobs.bench_moe``, ``jobs.bench_nas``, ``jobs.bench_cluster``, ``jobs.bench_security``, ``jobs.bench_drift``, ``jobs.bench_compress``, ``jobs.bench_gan``, ``jobs.bench_federated``, ``jobs.bench_calibration``) with its own flags (``--help`` after the section
name lists them); the measurements are in :mod:`dynray.bench`. An existing JSON file is
checked before the measurement starts, so a corrupt one is refused before minutes of work.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Union

import ray
import tyro

from dynray.bench import BUILT_SECTIONS, SECTIONS, BenchResult, BenchTarget, check_bench_file
from dynray.bench.static import Job, StaticSweepConfig, train_static
from dynray.data import Split
from dynray.errors import UnknownNameError
from dynray.flags import guarded, parse, setup_logging
from dynray.pipeline import bench_and_write
from dynray.registry import ModelRegistry
from dynray.training import TrainConfig
from jobs._ray import connect
from jobs import bench_calibration, bench_cluster, bench_compress, bench_drift, bench_federated, bench_gan, bench_moe, bench_nas, bench_router, bench_security, bench_serve

__all__ = ["CoreConfig", "Config", "run_core", "run", "parse_args", "main"]


@dataclass(frozen=True, kw_only=True)
class CoreConfig(BenchTarget):
    """Accuracy, MACs, oracle gap, exit mix, latency and throughput of a calibrated model, and the
    static-CNN baseline with both frontiers; merge the "core" section."""

    baselines: bool = True
    """Train the static-CNN sweep (Ray tasks, one CPU each; nets already in
    $DYNRAY_HOME/bench/static-sweep.json for this recipe and data are reused) and compare the
    frontiers. --no-baselines skips it."""
    static: StaticSweepConfig = field(default_factory=StaticSweepConfig)
    """The static CNNs of the baseline sweep."""
    parallel: int | None = None
    """Static nets trained at once (Ray tasks in flight); None = this machine's cores. More than
    the cores only slows each one down (a local Ray offers more logical CPUs than cores)."""


def _static_task(*args) -> dict:
    if not logging.getLogger().handlers:
        setup_logging()
    return train_static(*args)


def ray_map(train: Split, test: Split, recipe: TrainConfig, jobs: list[Job], *, parallel: int | None = None) -> Iterator[dict]:
    """The static sweep's nets as Ray tasks (one CPU each, at most ``parallel`` in flight; None =
    this machine's cores), their rows in the order of ``jobs``."""
    connect(log_to_driver=False)
    task = ray.remote(num_cpus=1)(_static_task)
    tr, te, rc = ray.put(train), ray.put(test), ray.put(recipe)
    window = max(1, parallel or os.cpu_count() or 1)
    pending = [task.remote(w, c, tr, te, rc, seed) for w, c, seed in jobs[:window]]
    for i in range(len(jobs)):
        row = ray.get(pending[i])
        if i + window < len(jobs):
            w, c, seed = jobs[i + window]
            pending.append(task.remote(w, c, tr, te, rc, seed))
        yield row


def run_core(cfg: CoreConfig) -> BenchResult:
    check_bench_file(cfg.json)
    section = bench_and_write(ModelRegistry(), cfg.model, dataset=cfg.dataset, json_path=cfg.json, plot_path=cfg.plot,
                              static=cfg.static if cfg.baselines else None, map_fn=functools.partial(ray_map, parallel=cfg.parallel))
    return BenchResult("core", section, cfg.json)


Config = Union[  # noqa: UP007 - tyro reads the subcommands from a typing.Union
    Annotated[CoreConfig, tyro.conf.subcommand("core")],
    Annotated[bench_serve.Config, tyro.conf.subcommand("serve")],
    Annotated[bench_router.Config, tyro.conf.subcommand("router")],
    Annotated[bench_moe.Config, tyro.conf.subcommand("moe")],
    Annotated[bench_nas.Config, tyro.conf.subcommand("nas")],
    Annotated[bench_cluster.Config, tyro.conf.subcommand("cluster")],
    Annotated[bench_security.Config, tyro.conf.subcommand("security")],
    Annotated[bench_drift.Config, tyro.conf.subcommand("drift")],
    Annotated[bench_compress.Config, tyro.conf.subcommand("compress")],
    Annotated[bench_gan.Config, tyro.conf.subcommand("gan")],
    Annotated[bench_federated.Config, tyro.conf.subcommand("federated")],
    Annotated[bench_calibration.Config, tyro.conf.subcommand("calibration")],
]
"""One config type per section; the section name on the command line picks it."""

_RUN = {CoreConfig: run_core, bench_serve.Config: bench_serve.run, bench_router.Config: bench_router.run,
        bench_moe.Config: bench_moe.run, bench_nas.Config: bench_nas.run, bench_cluster.Config: bench_cluster.run, bench_security.Config: bench_security.run,
        bench_drift.Config: bench_drift.run, bench_compress.Config: bench_compress.run, bench_gan.Config: bench_gan.run,
        bench_federated.Config: bench_federated.run, bench_calibration.Config: bench_calibration.run}


def run(cfg: CoreConfig | bench_serve.Config | bench_router.Config | bench_moe.Config | bench_nas.Config | bench_cluster.Config | bench_security.Config | bench_drift.Config | bench_compress.Config | bench_gan.Config | bench_federated.Config | bench_calibration.Config) -> BenchResult:
    return _RUN[type(cfg)](cfg)


def parse_args(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench") -> CoreConfig | bench_serve.Config | bench_router.Config | bench_moe.Config | bench_nas.Config | bench_cluster.Config:
    """The section's config from the command line (the section name first)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in BUILT_SECTIONS:
        planned = [s for s in SECTIONS if s not in BUILT_SECTIONS]
        close = difflib.get_close_matches(argv[0], BUILT_SECTIONS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        later = f" ({', '.join(planned)} are not built yet)" if planned else ""
        raise UnknownNameError("bench section", argv[0], BUILT_SECTIONS, fix=f"{hint}measure one of {', '.join(BUILT_SECTIONS)}{later}")
    if argv[:1] == ["nas"]:
        argv = bench_nas.unprefix(argv)
    return parse(Config, argv, prog=prog, description=__doc__)  # type: ignore[arg-type]


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench") -> int:
    print(run(parse_args(argv, prog=prog)).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench"))
