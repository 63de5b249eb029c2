"""Run an architecture search with Ray Tune (Ray Tune used as a library).

:func:`run_search` builds the Tuner: one CPU per trial, ``concurrency`` trials at a time, a
trial and wall-clock budget, the searcher from :data:`SEARCHERS` and, by default, the ASHA
scheduler over epochs. The foundation's default DynamicNet runs as a *reference trial*
under the same protocol (same loop, epochs, seed and measurement); ASHA ranks it but never
stops it, so the question "does a found architecture dominate the default?" compares equals.

After the search it classifies every trial (completed, stopped by ASHA, cut by the time
budget, failed), takes the Pareto front of the completed trials on val (adaptive accuracy ↑,
adaptive MACs ↓), checks dominance over the reference on the test split, measures the
performance predictor on held-out trials, registers the best front members in the model
registry and writes a results table (CSV), the front (PNG) and a JSON summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dynray.errors import ConfigError
from dynray.nas.config import SEARCHERS, NASConfig, NASResult, settings_for
from dynray.nas.searchers import SearchPlan
from dynray.registry import ModelRegistry, default_home

__all__ = ["run_search"]
log = logging.getLogger(__name__)

def _check_concurrency(plan: SearchPlan, cfg: NASConfig) -> None:
    """Tune wraps only a ``Searcher`` in a ConcurrencyLimiter; it silently ignores
    ``max_concurrent_trials`` for a variant generator, which must carry the limit itself."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    alg = plan.search_alg
    if isinstance(alg, BasicVariantGenerator) and alg.max_concurrent != cfg.concurrency:
        raise ConfigError(
            f"searcher {cfg.searcher!r} returned a BasicVariantGenerator whose max_concurrent is {alg.max_concurrent}, not the config's concurrency",
            got=alg.max_concurrent, fix=f"build it with BasicVariantGenerator(..., max_concurrent=cfg.concurrency) (here {cfg.concurrency})",
        )


def run_search(cfg: NASConfig, registry: ModelRegistry, *, out_dir: str | Path, progress: bool = True) -> NASResult:
    """Run the search on the connected Ray (the caller owns ``ray.init``); see the module docstring."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from dynray.bench.nas import summarise
    from dynray.nas.asha import ReferenceProtectedASHA

    settings = settings_for(cfg)
    plan = SEARCHERS[cfg.searcher](cfg, settings)
    _check_concurrency(plan, cfg)
    scheduler = ReferenceProtectedASHA(time_attr="training_iteration", max_t=cfg.epochs, grace_period=cfg.grace, reduction_factor=cfg.reduction) if cfg.asha else FIFOScheduler()
    storage = Path(cfg.storage_path or default_home() / "nas").absolute()
    storage.mkdir(parents=True, exist_ok=True)
    name = f"nas-{cfg.dataset}-{cfg.searcher}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainable = tune.with_resources(tune.with_parameters(plan.trainable, settings=settings, **plan.params), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space=plan.param_space,
        tune_config=tune.TuneConfig(
            metric="score", mode="max", num_samples=plan.num_samples, search_alg=plan.search_alg, scheduler=scheduler,
            max_concurrent_trials=cfg.concurrency, time_budget_s=cfg.time_budget_min * 60, reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), verbose=1 if progress else 0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),  # at most 2 per trial (first and last epoch); a limit forces state snapshots
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    log.info("NAS: %s searcher, %d trials, %d epochs max, %.1f min budget, %d at a time; results under %s", cfg.searcher, cfg.trials, cfg.epochs, cfg.time_budget_min, cfg.concurrency, storage / name)
    t0 = time.perf_counter()
    grid = tuner.fit()
    minutes = (time.perf_counter() - t0) / 60
    stopped = scheduler.stopped_early if isinstance(scheduler, ReferenceProtectedASHA) else set()
    return summarise(cfg, grid, stopped, minutes, registry, Path(out_dir))
