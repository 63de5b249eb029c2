"""Ray job: neural architecture search with Ray Tune (dynray.nas).

Runs the budgeted search on the connected Ray, prints the results table, writes the table
(CSV), the Pareto front (PNG) and a JSON summary under ``--out``, and registers the best
front members as ``nas-DATASET:vN``.

    python -m jobs.nas --dataset mnist-5k --trials 30 --time-budget 15 [--searcher evolution|random|darts]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Annotated

import tyro

from dynray.bench.nas import format_table
from dynray.flags import guarded, parse, setup_logging
from dynray.nas import NASConfig, NASResult, run_search
from dynray.nas.darts import DartsConfig
from jobs._ray import connect, job_registry

__all__ = ["SearchFlags", "Config", "run", "main"]

_N = NASConfig


@dataclass(frozen=True, kw_only=True)
class SearchFlags:
    """The search budget, searcher and scheduler."""

    trials: int = _N.trials
    """Trials in all, the reference included."""
    time_budget: float = _N.time_budget_min
    """Wall-clock budget in minutes."""
    searcher: str = _N.searcher
    """random, evolution or darts."""
    epochs: int = _N.epochs
    """Epochs of a trial that is never stopped (ASHA's max_t)."""
    grace: int = _N.grace
    """ASHA grace period in epochs."""
    reduction: int = _N.reduction
    """ASHA reduction factor."""
    asha: bool = _N.asha
    """Stop unpromising trials early with ASHA (--no-asha: every trial runs to the end)."""
    concurrency: int = _N.concurrency
    """Trials at once, 1 CPU each."""
    reference: bool = _N.include_default
    """Run the foundation default as the reference trial (--no-reference: do not)."""
    register_top: int = _N.register_top
    """Front members to register."""
    seed: int = _N.seed
    """Searcher and training seed."""
    train_limit: int | None = None
    """Train on the first N samples only (quick runs)."""
    darts_epochs: int = DartsConfig.epochs
    """DARTS supernet search epochs."""
    out: str = "out/nas"
    """Folder for the table, the front PNG and the JSON summary."""

    def nas_config(self, dataset: str) -> NASConfig:
        """Parse at the edge: the flags become a validated NASConfig (errors name the fix)."""
        return NASConfig(
            dataset=dataset, searcher=self.searcher, trials=self.trials, time_budget_min=self.time_budget, epochs=self.epochs, grace=self.grace,
            reduction=self.reduction, asha=self.asha, concurrency=self.concurrency, include_default=self.reference, register_top=self.register_top,
            seed=self.seed, train_limit=self.train_limit, darts=replace(DartsConfig(), epochs=self.darts_epochs),
        )


@dataclass(frozen=True, kw_only=True)
class Config:
    """Search architectures for a dataset with Ray Tune."""

    dataset: str = _N.dataset
    """Dataset to search on."""
    search: Annotated[SearchFlags, tyro.conf.OmitArgPrefixes] = field(default_factory=SearchFlags)
    """The search budget, searcher and scheduler."""


def run(cfg: Config) -> NASResult:
    nas_cfg = cfg.search.nas_config(cfg.dataset)  # bad input fails here, before Ray starts
    connect(num_cpus=max(2, nas_cfg.concurrency))
    return run_search(nas_cfg, job_registry(), out_dir=cfg.search.out)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.nas") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(format_table(run(cfg)), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.nas"))
