"""NAS benchmark: run the budgeted search and merge the "nas" section of the bench JSON.

Defaults are the NAS issue's budget: 30 trials (the foundation-default reference included),
15 minutes, evolution + ASHA on 2 CPUs. The front PNG and the table land next to the JSON
(in ``nas/`` beside it) unless ``--out`` says otherwise.

    python -m jobs.bench_nas --dataset mnist-5k --json out/bench.json
    dynray bench nas --json out/bench.json --nas-trials 12      (--nas-X is accepted for every --X)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.nas import format_table
from dynray.flags import guarded, parse, setup_logging
from dynray.nas import run_search
from dynray.registry import ModelRegistry
from jobs._ray import connect
from jobs.nas import SearchFlags

__all__ = ["Config", "run", "parse_args", "main", "unprefix", "NAS_PREFIX"]
NAS_PREFIX = "--nas-"
"""The bench's historical spelling of the search flags (``--nas-trials`` = ``--trials``)."""


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """Search architectures and merge the "nas" section."""

    search: Annotated[SearchFlags, tyro.conf.OmitArgPrefixes] = field(default_factory=SearchFlags)
    """The search budget, searcher and scheduler."""


def run(cfg: Config) -> BenchResult:
    check_bench_file(cfg.json)
    nas_cfg = cfg.search.nas_config(cfg.dataset or "mnist-5k")
    out = Path(cfg.search.out) if cfg.search.out != SearchFlags.out else Path(cfg.json).parent / "nas"
    connect(num_cpus=max(2, nas_cfg.concurrency))
    result = run_search(nas_cfg, ModelRegistry(), out_dir=out)
    print(format_table(result), flush=True)
    section = result.section()
    section["runs"] = _previous_runs(cfg.json) + [_run_row(section, nas_cfg.seed)]
    merge_section(cfg.json, "nas", section)
    return BenchResult("nas", section, cfg.json)


def _run_row(section: dict, seed: int) -> dict:
    """This run's entry of ``nas.runs[]``: the predictor's held-out rank correlation with its
    chance floor and val/test ceiling, next to the search's headline numbers."""
    first = section.get("predictor", {}).get("at_first_rung", {})
    return {
        "seed": seed, "searcher": section["searcher"], "trials": section["trials"], "minutes": section["minutes"],
        "asha_stopped_frac": section["asha_stopped_frac"], "dominates_default": section["dominates_default"],
        "predictor_spearman": section["predictor_spearman"], "predictor_spearman_null95": first.get("accuracy_null95"),
        "predictor_spearman_p": first.get("accuracy_p"), "predictor_val_test_spearman": first.get("val_test_spearman"),
        "predictor_trials": first.get("trials"), "accuracy_iqr_first_rung": first.get("accuracy_iqr"),
    }


def _previous_runs(path: str) -> list[dict]:
    """``nas.runs[]`` already in the bench JSON (each run appends itself); [] if none."""
    import json

    try:
        runs = json.loads(Path(path).read_text()).get("nas", {}).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in runs if isinstance(r, dict)]


def unprefix(argv: list[str]) -> list[str]:
    """``--nas-trials 3`` -> ``--trials 3``: tyro cannot spell a nested group's flags with a dash prefix."""
    return ["--" + a[len(NAS_PREFIX):] if a.startswith(NAS_PREFIX) else a for a in argv]


def parse_args(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_nas") -> Config:
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse(Config, unprefix(argv), prog=prog, description=__doc__)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_nas") -> int:
    print(run(parse_args(argv, prog=prog)).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_nas"))
