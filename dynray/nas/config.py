"""The types of an architecture search: its config, one trial's record, the search's result.

Also the searcher registry (:data:`SEARCHERS`, filled by :mod:`dynray.nas.searchers`), so a
config can refuse an unknown searcher without importing Tune.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynray.errors import ConfigError, UnknownNameError
from dynray.nas.darts import DartsConfig
from dynray.nas.evolution import EvolutionConfig
from dynray.nas.objectives import ObjectiveConfig
from dynray.nas.space import SearchSpace
from dynray.nas.trainable import TrialSettings

__all__ = ["SEARCHERS", "register_searcher", "NASConfig", "TrialRecord", "NASResult", "settings_for"]

SEARCHERS: dict[str, Callable[..., Any]] = {}
"""Searcher name -> ``plan(cfg: NASConfig, settings: TrialSettings) -> SearchPlan``; filled by
:mod:`dynray.nas.searchers` (imported explicitly by the package ``__init__``)."""


def register_searcher(name: str) -> Callable:
    """Decorator: register ``fn(cfg, settings) -> SearchPlan`` under ``name`` (duplicates raise)."""

    def deco(fn: Callable) -> Callable:
        if name in SEARCHERS:
            raise ConfigError("searcher registered twice", got=name, fix="pick a new name")
        SEARCHERS[name] = fn
        return fn

    return deco



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
            # what permuted predictions reach with this many held-out trials (95th percentile), and how
            # far a second measurement (test) of the same trials agrees with val: chance floor and ceiling
            "predictor_spearman_null95": self.predictor.get("at_first_rung", {}).get("accuracy_null95"),
            "predictor_val_test_spearman": self.predictor.get("at_first_rung", {}).get("val_test_spearman"),
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
