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

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from dynray.errors import ConfigError, UnknownNameError
from dynray.nas.darts import DartsConfig
from dynray.nas.evolution import EvolutionConfig
from dynray.nas.objectives import ObjectiveConfig
from dynray.nas.searchers import SEARCHERS
from dynray.nas.space import SearchSpace
from dynray.nas.trainable import TrialSettings
from dynray.registry import ModelRegistry, default_home

__all__ = ["NASConfig", "TrialRecord", "NASResult", "run_search", "settings_for"]
log = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class NASConfig:
    """One architecture search."""

    dataset: str = "mnist-5k"
    """Dataset name."""
    searcher: str = "evolution"
    """random (Tune's BasicVariantGenerator), evolution (dynray.nas.evolution) or darts."""
    trials: int = 30
    """Trials in all, the reference trial included."""
    time_budget_min: float = 15.0
    """Wall-clock budget of the Tune run; trials still running then are cut."""
    epochs: int = 20
    """Epochs of a trial that runs to the end (ASHA's max_t); 20, as ``dynray train``."""
    asha: bool = True
    """Stop unpromising trials early with ASHA (else FIFO: every trial runs to the end)."""
    grace: int = 2
    """ASHA's grace period in epochs (the first rung)."""
    reduction: int = 3
    """ASHA's reduction factor: a rung promotes the best 1/reduction."""
    concurrency: int = 2
    """Trials running at once (1 CPU each)."""
    include_default: bool = True
    """Run the foundation default as the reference trial (evolution and random)."""
    register_top: int = 3
    """Front members registered in the model registry (best score first)."""
    seed: int = 0
    """Seeds the searcher and every trial's training."""
    batch_size: int = 64
    """Training batch size of every trial."""
    train_limit: int | None = None
    """Train each trial on the first N training samples only (tiny test runs)."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""
    storage_path: str | None = None
    """Where Tune keeps trial results and checkpoints; None = $DYNRAY_HOME/nas."""
    space: SearchSpace = field(default_factory=SearchSpace)
    """The search space."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """How trials are measured and ranked."""
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    """Knobs of the evolutionary searcher."""
    darts: DartsConfig = field(default_factory=DartsConfig)
    """The DARTS supernet (searcher darts)."""

    def __post_init__(self) -> None:
        if self.searcher not in SEARCHERS:
            raise UnknownNameError("searcher", self.searcher, SEARCHERS)
        if self.trials < 1:
            raise ConfigError("the search needs at least one trial", got=self.trials, fix="use e.g. --trials 30")
        if not self.time_budget_min > 0 or not math.isfinite(self.time_budget_min):
            raise ConfigError("the time budget must be a positive number of minutes", got=self.time_budget_min, fix="use e.g. --time-budget 15")
        if self.epochs < 1 or not 1 <= self.grace <= self.epochs or self.reduction < 2:
            raise ConfigError("need epochs >= 1, 1 <= grace <= epochs and reduction >= 2", got={"epochs": self.epochs, "grace": self.grace, "reduction": self.reduction}, fix="e.g. --epochs 9 --grace 1 --reduction 3")
        if self.concurrency < 1 or self.register_top < 0:
            raise ConfigError("concurrency must be >= 1 and register_top >= 0", got=(self.concurrency, self.register_top), fix="e.g. --concurrency 2")
        if self.include_default and self.searcher != "darts" and not self.space.contains_default():
            raise ConfigError("the search space does not contain the foundation default, so it cannot run as the reference trial", got=self.space, fix="widen the space (widths 16/32/64, layers 1/2, kernel 3, exit_hidden 64, 3 stages) or pass --no-reference")


@dataclass(frozen=True)
class TrialRecord:
    """One trial, classified."""

    trial_id: str
    status: str  # completed | stopped (by ASHA) | budget (cut by the time budget) | failed
    candidate: dict
    epochs: int
    metrics: dict  # the last report's metrics (empty for a failed trial without reports)
    reference: bool
    error: str | None = None
    checkpoint: str | None = None
    darts: dict | None = None

    def row(self) -> dict:
        m = self.metrics
        return {
            "trial": self.trial_id, "status": self.status, "reference": self.reference, "epochs": self.epochs,
            "accuracy": m.get("accuracy"), "macs": m.get("macs"), "latency_ms": m.get("latency_ms"), "score": m.get("score"),
            "test_accuracy": m.get("test_accuracy"), "test_macs": m.get("test_macs"), "config": _describe(self.candidate), "error": self.error,
        }


def _describe(candidate: dict) -> str:
    from dynray.nas.space import Candidate

    try:
        return Candidate.from_dict(candidate).describe()
    except Exception:  # a crashed trial may carry a candidate that does not build
        return json.dumps(candidate)


@dataclass(frozen=True)
class NASResult:
    """What a search produced (see :func:`run_search`)."""

    config: NASConfig
    trials: list[TrialRecord]
    front: list[int]  # indices into trials, by increasing MACs
    minutes: float
    asha_stopped_frac: float
    predictor: dict
    registered: list[str]
    dominance: dict
    files: dict[str, str]

    @property
    def reference(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.reference), None)

    def section(self) -> dict:
        """The ``"nas"`` bench section."""
        c = self.config
        return {
            "dataset": c.dataset,
            "searcher": c.searcher,
            "trials": len(self.trials),
            "minutes": self.minutes,
            "asha_stopped_frac": self.asha_stopped_frac,
            # accuracy, ranked at equal training (every held-out trial at the first rung); None if too few trials
            "predictor_spearman": self.predictor.get("at_first_rung", {}).get("accuracy"),
            "predictor": self.predictor,
            "dominates_default": self.dominance.get("dominates_default", False),
            "dominance": self.dominance,
            "front": [{"accuracy": self.trials[i].metrics["accuracy"], "macs": self.trials[i].metrics["macs"],
                       "test_accuracy": self.trials[i].metrics["test_accuracy"], "test_macs": self.trials[i].metrics["test_macs"],
                       "latency_ms": self.trials[i].metrics["latency_ms"], "config": self.trials[i].candidate,
                       "describe": _describe(self.trials[i].candidate), "trial": self.trials[i].trial_id} for i in self.front],
            "reference": self.reference.row() if self.reference else None,
            "status_counts": {s: sum(t.status == s for t in self.trials) for s in ("completed", "stopped", "budget", "failed")},
            "registered": self.registered,
            "epochs": c.epochs,
            "time_budget_min": c.time_budget_min,
            "files": self.files,
        }


def settings_for(cfg: NASConfig) -> TrialSettings:
    """What every trial of this search shares."""
    return TrialSettings(dataset=cfg.dataset, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, train_limit=cfg.train_limit, data_root=cfg.data_root, space=cfg.space, objective=cfg.objective)


def run_search(cfg: NASConfig, registry: ModelRegistry, *, out_dir: str | Path, progress: bool = True) -> NASResult:
    """Run the search on the connected Ray (the caller owns ``ray.init``); see the module docstring."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from dynray.nas.report import summarise
    from dynray.nas.asha import ReferenceProtectedASHA

    settings = settings_for(cfg)
    plan = SEARCHERS[cfg.searcher](cfg, settings)
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
