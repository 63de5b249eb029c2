"""Ablation of the calibrator's rule families: the ``"calibration"`` bench section.

Plain torch on cached exit records (``jobs/bench_calibration.py`` collects them from a
registered model and calls :func:`bench_calibration`). Four variants of the threshold rule
are calibrated on val to the same target, each with the cross-validated family choice of
:func:`dynray.thresholds.calibrate`, and measured on test:

- ``confidence``: confidence alone (β = 0, γ = 0; the confidence measure is still chosen);
- ``complexity``: + the complexity term (β searched, γ = 0);
- ``agreement``: + the agreement bonus (β = 0, γ searched);
- ``all``: β and γ searched together;
- ``all_no_cv``: the same grid chosen on all of val (the pre-CV calibrator), for comparison.

Per seed, the seed is the CV fold split and draws which val samples are used (80% of val by
default, so the seeds see different data) (a subsample without replacement: a bootstrap would put copies of one
sample into both the training and the held-out folds, and CV would then reward overfitting).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords, simulate
from dynray.thresholds import CalibrationTarget, calibrate

__all__ = ["VARIANTS", "CalibrationBenchConfig", "bench_calibration", "format_calibration"]
log = logging.getLogger(__name__)

VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "confidence": (False, False, True),
    "complexity": (True, False, True),
    "agreement": (False, True, True),
    "all": (True, True, True),
    "all_no_cv": (True, True, False),
}
"""Variant -> (search β, search γ, cross-validated choice)."""


@dataclass(frozen=True, kw_only=True)
class CalibrationBenchConfig:
    """How the calibration section measures."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One CV fold split and val subsample (see --val-fraction) per seed."""
    max_drop: float = 0.002
    """Accuracy-drop target every variant is calibrated to (the demo's)."""
    cv_folds: int = 5
    """Folds of the cross-validated choice."""
    val_fraction: float = 0.8
    """Share of the val split each seed calibrates on (drawn without replacement); 1 = all of it."""
    complexity_weights: tuple[float, ...] = (0.0, 0.1, 0.2)
    """β grid of the variants that search β."""
    agreement_bonuses: tuple[float, ...] = (0.0, 0.1, 0.2)
    """γ grid of the variants that search γ."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("the calibration bench needs at least one seed", got=self.seeds, fix="pass e.g. --seeds 0 1 2")
        if not 0.0 <= self.max_drop <= 1.0:
            raise ConfigError("the calibration bench's max drop must be in [0, 1]", got=self.max_drop, fix="use e.g. --max-drop 0.002")
        if self.cv_folds < 2:
            raise ConfigError("the calibration bench compares cross-validated choices: it needs at least 2 folds", got=self.cv_folds,
                              fix="use e.g. --cv-folds 5 (the all_no_cv variant shows the choice without CV)")
        if not 0.0 < self.val_fraction <= 1.0:
            raise ConfigError("the val fraction must be in (0, 1]", got=self.val_fraction, fix="use e.g. --val-fraction 0.8, or 1 for all of val")
        if 0.0 not in self.complexity_weights or 0.0 not in self.agreement_bonuses:
            raise ConfigError("the β and γ grids must contain 0 (the confidence-only rule)", got=(self.complexity_weights, self.agreement_bonuses),
                              fix="e.g. --complexity-weights 0 0.1 0.2 --agreement-bonuses 0 0.1 0.2")


def _subsample(rec: ExitRecords, fraction: float, seed: int) -> ExitRecords:
    if fraction >= 1.0:
        return rec
    n = rec.labels.shape[0]
    idx = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(n, size=max(2, round(fraction * n)), replace=False)))
    return ExitRecords(logits=rec.logits[:, idx], complexity=rec.complexity[idx], labels=rec.labels[idx], cum_macs=rec.cum_macs, full_macs=rec.full_macs)


def bench_calibration(val: ExitRecords, test: ExitRecords, *, cfg: CalibrationBenchConfig) -> dict:
    """Every variant calibrated on ``val`` per seed and measured on ``test`` (JSON-able)."""
    target = CalibrationTarget(max_drop=cfg.max_drop)
    per_variant: dict[str, dict] = {}
    for name, (beta, gamma, cv) in VARIANTS.items():
        rows = []
        for seed in cfg.seeds:
            rec = _subsample(val, cfg.val_fraction, seed)
            res = calibrate(rec, target, complexity_weights=cfg.complexity_weights if beta else (0.0,),
                            agreement_bonuses=cfg.agreement_bonuses if gamma else (0.0,), cv_folds=cfg.cv_folds if cv else 0, cv_seed=seed)
            out = simulate(test, res.rule)
            rows.append({"seed": seed, "accuracy": out.accuracy, "mean_macs": out.mean_macs, "exit_fractions": list(out.exit_fractions),
                         "confidence": res.rule.confidence, "complexity_weight": res.rule.complexity_weight, "agreement_bonus": res.rule.agreement_bonus,
                         "thresholds": list(res.rule.thresholds), "val_accuracy": res.val.accuracy, "val_mean_macs": res.val.mean_macs})
            log.info("%s seed %d: %s beta=%g gamma=%g -> test accuracy %.4f, %.0f MACs", name, seed, res.rule.confidence,
                     res.rule.complexity_weight, res.rule.agreement_bonus, out.accuracy, out.mean_macs)
        per_variant[name] = {"per_seed": rows, "accuracy_mean": float(np.mean([r["accuracy"] for r in rows])),
                             "macs_mean": float(np.mean([r["mean_macs"] for r in rows]))}
    return {
        "seeds": list(cfg.seeds),
        "per_variant": per_variant,
        "max_drop": cfg.max_drop,
        "cv_folds": cfg.cv_folds,
        "val_fraction": cfg.val_fraction,
        "n_val": int(val.labels.shape[0]),
        "n_val_used": max(2, round(cfg.val_fraction * int(val.labels.shape[0]))) if cfg.val_fraction < 1.0 else int(val.labels.shape[0]),
        "n_test": int(test.labels.shape[0]),
        "test_accuracy_last_exit": test.exit_accuracy()[-1],
        "macs_full": float(test.cum_macs[-1]),
    }


def format_calibration(s: dict) -> str:
    """The calibration section as text: one row per variant and seed."""
    lines = [f"  target max drop {s['max_drop']}, {s['cv_folds']}-fold CV on {s.get('n_val_used', s['n_val'])} of {s['n_val']} val samples per seed; "
             f"test: {s['n_test']} samples, last exit {s['test_accuracy_last_exit']:.4f} at {s['macs_full']:,.0f} MACs"]
    for name, v in s["per_variant"].items():
        lines.append(f"  {name:<11} mean accuracy {v['accuracy_mean']:.4f}, mean MACs {v['macs_mean']:,.0f}")
        for r in v["per_seed"]:
            lines.append(f"    seed {r['seed']}: {r['accuracy']:.4f} {r['mean_macs']:>10,.0f} MACs  ({r['confidence']}, beta {r['complexity_weight']:g}, gamma {r['agreement_bonus']:g})")
    return "\n".join(lines)
