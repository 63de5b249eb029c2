"""Ray job: calibrate a registered model's thresholds on its validation split (registers a child version).

    python -m jobs.calibrate --model production --max-drop 0.005
    python -m jobs.calibrate --model dynnet-mnist-5k:v1 --macs-budget 150000 --promote production
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from jobs._ray import job_registry
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.pipeline import calibrate_and_register
from dynray.thresholds import CalibrationTarget

__all__ = ["Config", "Result", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Calibrate thresholds on val to one target: an accuracy drop or a MAC budget."""

    model: str | None = None
    """Model ref (name, name:vN, production, staging); default: production, else the newest."""
    max_drop: float | None = None
    """Largest allowed accuracy drop vs the last exit on val, e.g. 0.005 (give this or --macs-budget)."""
    macs_budget: float | None = None
    """Largest allowed mean MACs per sample on val (give this or --max-drop)."""
    promote: Literal["staging", "production"] | None = None
    """Promote the calibrated version to this stage."""
    cv_folds: int = 5
    """Folds of the cross-validated choice of confidence measure, complexity weight and agreement bonus; 0 = choose on all of val (the pre-CV calibrator)."""
    cv_seed: int = 0
    """Seed of the CV fold split."""

    def __post_init__(self) -> None:
        if (self.max_drop is None) == (self.macs_budget is None):
            raise ConfigError("give exactly one calibration target", got={"max_drop": self.max_drop, "macs_budget": self.macs_budget}, fix="pass --max-drop 0.005 or --macs-budget 150000")
        if self.cv_folds < 0:
            raise ConfigError("--cv-folds must be >= 0", got=self.cv_folds, fix="pass --cv-folds 5, or 0 to choose on all of val")

    def target(self) -> CalibrationTarget:
        return CalibrationTarget(max_drop=self.max_drop, macs_budget=self.macs_budget)


@dataclass(frozen=True)
class Result:
    model: str
    """The calibrated child version."""
    rule: dict
    """The calibrated stop rule (ThresholdRule.to_dict())."""
    calibration: dict
    """What calibration measured on val."""

    def summary(self) -> str:
        c, r = self.calibration, self.rule
        lines = [
            f"registered {self.model}: thresholds {[round(t, 4) for t in r['thresholds']]} ({r['confidence']}, complexity weight {r['complexity_weight']}, agreement bonus {r['agreement_bonus']})",
            f"  val accuracy {c['val_accuracy']:.4f} vs last exit {c['val_reference_accuracy']:.4f}; {c['val_macs_saving']:.2f}x fewer MACs; exits {[round(f, 3) for f in c['val_exit_fractions']]}",
        ]
        chosen = next((r for r in c.get("cv", []) if r["chosen"]), None)
        if chosen:
            lines.append(f"  chosen by {c['cv_folds']}-fold CV of {len(c['cv'])} (confidence, complexity weight, agreement bonus) combinations: held-out accuracy "
                         f"{chosen['accuracy_mean']:.4f} +- {chosen['accuracy_se']:.4f}, MACs {chosen['mean_macs_mean']:,.0f} +- {chosen['mean_macs_se']:,.0f}")
        lines += [f"  exit {s['exit'] + 1}: tau {s['threshold']:.4f}  d(acc)/d(tau) {s['d_accuracy_d_threshold']:+.4f}  d(MACs)/d(tau) {s['d_macs_d_threshold']:+,.0f}" for s in c["sensitivity"]]
        return "\n".join(lines)


def run(cfg: Config) -> Result:
    registry = job_registry()
    info, res = calibrate_and_register(registry, cfg.model, cfg.target(), cv_folds=cfg.cv_folds, cv_seed=cfg.cv_seed)
    if cfg.promote:
        info = registry.promote(info.ref, cfg.promote)
    return Result(model=info.ref, rule=res.rule.to_dict(), calibration=info.meta["calibration"])


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.calibrate") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.calibrate"))
