"""Ray job: ablation of the calibrator's rule families; merges the "calibration" section of the bench JSON.

    python -m jobs.bench_calibration --json out/bench.json
    dynray bench calibration --json out/bench.json [--max-drop 0.002] [--seeds 0 1 2] [--val-fraction 1.0]

Self-contained after `make demo`: the model is the ``production`` one (or ``--model``). Its
exits are run once on val and test; then confidence alone, + complexity (β), + agreement (γ)
and all of them are calibrated on val with the cross-validated choice (plus the whole grid
chosen without CV) and measured on test, per seed; see :mod:`dynray.bench.calibration`.
Nothing is registered.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.calibration import CalibrationBenchConfig, bench_calibration
from dynray.data import load_dataset
from dynray.evaluation import collect_exit_outputs
from dynray.flags import guarded, parse, setup_logging
from dynray.store import load_model
from jobs._ray import job_registry

__all__ = ["Config", "run", "main"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """Confidence alone vs + complexity vs + agreement vs all, calibrated on val with CV and measured on test, over seeds; merge the "calibration" section."""

    calibration: Annotated[CalibrationBenchConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=CalibrationBenchConfig)
    """How the section measures."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""


def run(cfg: Config) -> BenchResult:
    check_bench_file(cfg.json)
    stored = load_model(job_registry(), cfg.model)
    dataset = cfg.dataset or stored.dataset
    val, test = (load_dataset(dataset, s, root=cfg.data_root) for s in ("val", "test"))
    log.info("calibration ablation of %s on %s: %d seeds", stored.info.ref, dataset, len(cfg.calibration.seeds))
    rec_val = collect_exit_outputs(stored.model, val.images, val.labels)
    rec_test = collect_exit_outputs(stored.model, test.images, test.labels)
    section = {"model": stored.info.ref, "dataset": dataset, **bench_calibration(rec_val, rec_test, cfg=cfg.calibration)}
    merge_section(cfg.json, "calibration", section)
    return BenchResult("calibration", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_calibration") -> int:
    print(run(parse(Config, argv, prog=prog, description=__doc__)).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_calibration"))
