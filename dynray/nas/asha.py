"""ASHA for architecture search (Ray Tune used as a library)."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from dynray.nas.trainable import REFERENCE_KEY

__all__ = ["ReferenceProtectedASHA"]


class ReferenceProtectedASHA(ASHAScheduler):
    """ASHA that ranks the reference trial with the others but never stops it early, and
    remembers which trials it stopped (so the report can tell them from budget cuts)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped_early: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            if trial.config.get(REFERENCE_KEY):
                return TrialScheduler.CONTINUE
            self.stopped_early.add(trial.trial_id)
        return action
