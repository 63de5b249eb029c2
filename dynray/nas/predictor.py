"""Performance predictor: config vector (+ epochs trained) -> accuracy, MACs, latency.

Fitted on the reports of finished trials, one row per reported epoch, so the predictor also
learns from trials ASHA stopped early; asked about a new candidate it predicts the value at
the full trial length. One Gaussian process per metric (scikit-learn; Matérn 5/2 kernel with
one length scale per gene, plus a noise term), on transformed targets: ``log(1 − accuracy)``,
``log(MACs)``, ``log(latency)``. The evolutionary searcher uses it to pre-screen offspring;
:func:`heldout_spearman` measures its rank correlation on trials it was not fitted on.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynray.errors import ConfigError

__all__ = ["PREDICTED", "Observation", "PerformancePredictor", "heldout_spearman"]
log = logging.getLogger(__name__)

PREDICTED = ("accuracy", "macs", "latency_ms")
"""The metrics the predictor maps a config vector to."""


@dataclass(frozen=True)
class Observation:
    """One report of one trial."""

    trial: str
    vector: np.ndarray  # [D] the candidate's encoding
    epoch: int
    metrics: dict[str, float]


def _to_target(metric: str, v: float) -> float:
    if metric == "accuracy":
        return math.log(max(1.0 - v, 1e-3))
    return math.log(max(v, 1e-9))


def _from_target(metric: str, t: np.ndarray) -> np.ndarray:
    if metric == "accuracy":
        return 1.0 - np.exp(t)
    return np.exp(t)


class PerformancePredictor:
    """One GP per metric over [vector, epoch / max_epochs]."""

    def __init__(self, max_epochs: int, *, metrics: Sequence[str] = PREDICTED, seed: int = 0) -> None:
        if max_epochs < 1:
            raise ConfigError("max_epochs must be >= 1", got=max_epochs, fix="pass the trial length in epochs")
        self.max_epochs = max_epochs
        self.metrics = tuple(metrics)
        self.seed = seed
        self.models: dict = {}

    def _x(self, vectors: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        return np.hstack([vectors, (epochs / self.max_epochs).reshape(-1, 1)])

    @property
    def fitted(self) -> bool:
        return bool(self.models)

    def fit(self, obs: Sequence[Observation]) -> PerformancePredictor:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        if len(obs) < 3:
            raise ConfigError("the predictor needs at least 3 observations", got=len(obs), fix="let more trials finish before fitting")
        x = self._x(np.stack([o.vector for o in obs]), np.asarray([o.epoch for o in obs], dtype=np.float64))
        for m in self.metrics:
            y = np.asarray([_to_target(m, o.metrics[m]) for o in obs])
            kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(length_scale=np.ones(x.shape[1]), length_scale_bounds=(5e-2, 1e2), nu=2.5) + WhiteKernel(1e-2, (1e-5, 1.0))
            gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=0, random_state=self.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gp.fit(x, y)
            self.models[m] = gp
        return self

    def predict(self, vectors: np.ndarray, epochs: int | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Predicted metrics for ``vectors`` [n, D] after ``epochs`` (default: the full trial)."""
        if not self.fitted:
            raise ConfigError("the predictor is not fitted", fix="call fit() on finished trials first")
        vectors = np.atleast_2d(vectors)
        if epochs is None or np.isscalar(epochs):
            ep = np.full(len(vectors), float(self.max_epochs if epochs is None else epochs))  # type: ignore[arg-type]
        else:
            ep = np.asarray(epochs, dtype=np.float64)
        x = self._x(vectors, ep)
        return {m: _from_target(m, gp.predict(x)) for m, gp in self.models.items()}


def _last_rows(obs: Sequence[Observation], trials: set[str]) -> list[Observation]:
    last: dict[str, Observation] = {}
    for o in obs:
        if o.trial in trials and (o.trial not in last or o.epoch > last[o.trial].epoch):
            last[o.trial] = o
    return list(last.values())


def heldout_spearman(obs: Sequence[Observation], max_epochs: int, *, folds: int = 5, seed: int = 0, at_epoch: int | None = 1) -> dict:
    """K-fold by trial: fit on the other trials' reports, predict the held-out trials.

    ``at_epoch`` compares every held-out trial at that epoch (all trials reach the first
    rung, so this ranks architectures at equal training, with no help from the epoch
    count); None compares each held-out trial at its last reported epoch.
    Returns Spearman's rho per metric and the number of held-out trials compared.
    """
    from scipy.stats import spearmanr

    trials = sorted({o.trial for o in obs})
    if len(trials) < max(folds, 4):
        raise ConfigError("too few trials for a held-out predictor check", got=len(trials), fix=f"run at least {max(folds, 4)} trials")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(trials))
    pred: dict[str, list[float]] = {m: [] for m in PREDICTED}
    true: dict[str, list[float]] = {m: [] for m in PREDICTED}
    for f in range(folds):
        held = set(order[f::folds])
        fit_rows = [o for o in obs if o.trial not in held]
        if at_epoch is None:
            test_rows = _last_rows(obs, held)
        else:
            test_rows = [o for o in obs if o.trial in held and o.epoch == at_epoch]
        if not test_rows or len(fit_rows) < 3:
            continue
        p = PerformancePredictor(max_epochs, seed=seed).fit(fit_rows).predict(np.stack([o.vector for o in test_rows]), np.asarray([o.epoch for o in test_rows]))
        for m in PREDICTED:
            pred[m] += p[m].tolist()
            true[m] += [o.metrics[m] for o in test_rows]
    out: dict = {"trials": len(true["accuracy"]), "at_epoch": at_epoch}
    for m in PREDICTED:
        rho = spearmanr(pred[m], true[m]).statistic if len(pred[m]) >= 3 else float("nan")
        out[m] = float(rho)
    return out
