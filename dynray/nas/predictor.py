"""Performance predictor: candidate (+ epochs trained) -> accuracy, MACs, latency.

Fitted on the reports of finished trials, one row per reported epoch, so the predictor also
learns from trials ASHA stopped early; asked about a new candidate it predicts the value at
the full trial length. Targets are transformed (``log(1 − accuracy)``, ``log(MACs)``,
``log(latency)``) and standardised.

Inputs. A candidate enters as its encoding vector; with ``features`` (a callable, normally
:class:`dynray.nas.proxies.CandidateFeatures`) the vector is replaced by cheap per-candidate
features: MACs, parameters, depth, log learning rate, ... and zero-cost proxies scored at
initialisation on one batch (synflow, grad-norm, jacob_cov). The epochs trained enter as
``log(1 + epoch) / log(1 + max_epochs)``.

Model. An ensemble (:class:`PredictorConfig`) of ridge regression and extremely randomised
trees (optionally a Gaussian process: Matérn 5/2, one length scale per input, plus noise);
their standardised predictions are averaged. The evolutionary searcher uses it to pre-screen
offspring; :func:`heldout_spearman` measures its rank correlation on trials it was not
fitted on, with a permutation baseline and the val/test agreement of the compared trials.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dynray.errors import ConfigError

__all__ = ["PREDICTED", "MEMBERS", "Features", "Observation", "PredictorConfig", "PerformancePredictor", "heldout_spearman"]
log = logging.getLogger(__name__)

PREDICTED = ("accuracy", "macs", "latency_ms")
"""The metrics the predictor maps a candidate to."""
MEMBERS = ("gp", "ridge", "trees")
"""The ensemble's possible members."""

Features = Callable[[np.ndarray], np.ndarray]
"""[n, D] encoding vectors -> [n, F] feature rows."""


@dataclass(frozen=True)
class Observation:
    """One report of one trial (``metrics`` holds at least the :data:`PREDICTED` ones; a
    ``test_accuracy`` there is used by :func:`heldout_spearman` as a second measurement)."""

    trial: str
    vector: np.ndarray  # [D] the candidate's encoding
    epoch: int
    metrics: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class PredictorConfig:
    """The ensemble."""

    members: tuple[str, ...] = ("ridge", "trees")
    """Regressors whose standardised predictions are averaged (a subset of MEMBERS). The GP
    is off by default: on held-out trials of real runs it ranked no better than ridge and
    trees, and its fit takes seconds where theirs takes a tenth of one."""
    with_vector: bool = False
    """Append the raw encoding vector to the features (when a ``features`` callable is given)."""
    ridge_alpha: float = 3.0
    """L2 penalty of the ridge member (on standardised inputs)."""
    trees: int = 200
    """Trees of the extra-trees member."""
    min_leaf: int = 2
    """Minimum samples per leaf of the extra-trees member."""

    def __post_init__(self) -> None:
        if not self.members or set(self.members) - set(MEMBERS):
            raise ConfigError("unknown or empty predictor members", got=self.members, fix=f"choose from {MEMBERS}")
        if self.ridge_alpha <= 0 or self.trees < 1 or self.min_leaf < 1:
            raise ConfigError("ridge_alpha must be > 0, trees and min_leaf >= 1", got=(self.ridge_alpha, self.trees, self.min_leaf), fix="e.g. ridge_alpha=3.0, trees=200, min_leaf=2")


def _to_target(metric: str, v: float) -> float:
    if metric == "accuracy":
        return math.log(max(1.0 - v, 1e-3))
    return math.log(max(v, 1e-9))


def _from_target(metric: str, t: np.ndarray) -> np.ndarray:
    if metric == "accuracy":
        return 1.0 - np.exp(t)
    return np.exp(t)


def _member(name: str, dim: int, cfg: PredictorConfig, seed: int):
    if name == "gp":
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(length_scale=np.full(dim, 2.0), length_scale_bounds=(1e-1, 1e3), nu=2.5) + WhiteKernel(1e-1, (1e-4, 1.0))
        return GaussianProcessRegressor(kernel=kernel, normalize_y=False, n_restarts_optimizer=0, random_state=seed)
    if name == "ridge":
        from sklearn.linear_model import Ridge

        return Ridge(alpha=cfg.ridge_alpha)
    from sklearn.ensemble import ExtraTreesRegressor

    return ExtraTreesRegressor(n_estimators=cfg.trees, min_samples_leaf=cfg.min_leaf, max_features=0.5, random_state=seed, n_jobs=1)


class PerformancePredictor:
    """An ensemble per metric over [features(vector), epoch]; see the module docstring."""

    def __init__(self, max_epochs: int, *, metrics: Sequence[str] = PREDICTED, seed: int = 0, features: Features | None = None, config: PredictorConfig | None = None) -> None:
        if max_epochs < 1:
            raise ConfigError("max_epochs must be >= 1", got=max_epochs, fix="pass the trial length in epochs")
        unknown = set(metrics) - set(PREDICTED)
        if not metrics or unknown:
            raise ConfigError("unknown predictor metrics", got=sorted(unknown) or list(metrics), fix=f"choose from {PREDICTED}")
        self.max_epochs = max_epochs
        self.metrics = tuple(metrics)
        self.seed = seed
        self.features = features
        self.config = config or PredictorConfig()
        self.models: dict[str, list] = {}
        self._x_mean: np.ndarray | None = None
        self._x_std: np.ndarray | None = None
        self._y: dict[str, tuple[float, float]] = {}

    def _raw(self, vectors: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
        if self.features is None:
            feats = vectors
        else:
            uniq, inv = np.unique(np.round(vectors, 6), axis=0, return_inverse=True)
            feats = np.asarray(self.features(uniq), dtype=np.float64)[inv.reshape(-1)]
            if self.config.with_vector:
                feats = np.hstack([feats, vectors])
        ep = np.log1p(np.asarray(epochs, dtype=np.float64)) / math.log1p(self.max_epochs)
        return np.hstack([feats, ep.reshape(-1, 1)])

    def _x(self, vectors: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        assert self._x_mean is not None and self._x_std is not None
        return (self._raw(vectors, epochs) - self._x_mean) / self._x_std

    @property
    def fitted(self) -> bool:
        return bool(self.models)

    def fit(self, obs: Sequence[Observation]) -> PerformancePredictor:
        """Fit every metric's ensemble on ``obs`` (one row per report)."""
        from sklearn.exceptions import ConvergenceWarning

        if len(obs) < 3:
            raise ConfigError("the predictor needs at least 3 observations", got=len(obs), fix="let more trials finish before fitting")
        missing = [m for m in self.metrics if any(m not in o.metrics for o in obs)]
        if missing:
            raise ConfigError("observations lack a predicted metric", got=missing, fix="report accuracy, macs and latency_ms from every trial")
        raw = self._raw(np.stack([o.vector for o in obs]), np.asarray([o.epoch for o in obs], dtype=np.float64))
        self._x_mean = raw.mean(axis=0)
        std = raw.std(axis=0)
        self._x_std = np.where(std > 1e-12, std, 1.0)
        x = (raw - self._x_mean) / self._x_std
        self.models = {}
        for m in self.metrics:
            y = np.asarray([_to_target(m, o.metrics[m]) for o in obs])
            mu, sd = float(y.mean()), float(y.std()) or 1.0
            self._y[m] = (mu, sd)
            members = []
            for name in self.config.members:
                reg = _member(name, x.shape[1], self.config, self.seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    reg.fit(x, (y - mu) / sd)
                members.append(reg)
            self.models[m] = members
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
        out = {}
        for m, members in self.models.items():
            mu, sd = self._y[m]
            z = np.mean([reg.predict(x) for reg in members], axis=0)
            out[m] = _from_target(m, mu + sd * z)
        return out


def _last_rows(obs: Sequence[Observation], trials: set[str]) -> list[Observation]:
    last: dict[str, Observation] = {}
    for o in obs:
        if o.trial in trials and (o.trial not in last or o.epoch > last[o.trial].epoch):
            last[o.trial] = o
    return list(last.values())


@dataclass
class _Pooled:
    pred: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in PREDICTED})
    true: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in PREDICTED})
    test: list[float] = field(default_factory=list)


def heldout_spearman(
    obs: Sequence[Observation], max_epochs: int, *, folds: int = 5, seed: int = 0, at_epoch: int | None = 1,
    features: Features | None = None, config: PredictorConfig | None = None, permutations: int = 1000,
) -> dict:
    """K-fold by candidate: fit on the other candidates' reports, predict the held-out ones.

    Trials are grouped by their encoding, so a candidate run twice is never on both sides.
    ``at_epoch`` compares every held-out trial at that epoch (all trials reach the first
    rung, so this ranks architectures at equal training, with no help from the epoch
    count); None compares each held-out trial at its last reported epoch (the epochs
    trained then dominate the ranking).

    Returns Spearman's rho per metric, the number of held-out trials compared, and for
    accuracy: ``accuracy_null95`` (95th percentile of rho for randomly permuted predictions,
    i.e. what chance reaches with this many trials), ``accuracy_p`` (share of permutations at
    least as good), ``accuracy_iqr`` (spread of the compared accuracies) and, when the
    reports carry ``test_accuracy``, ``val_test_spearman`` (how far a second measurement of
    the same trials agrees with the val ranking: a ceiling on what a predictor can reach).
    """
    from scipy.stats import spearmanr

    def key(o: Observation) -> tuple[float, ...]:
        return tuple(np.round(o.vector, 4).tolist())

    groups = sorted({key(o) for o in obs})
    if len(groups) < max(folds, 4):
        raise ConfigError("too few trials for a held-out predictor check", got=len(groups), fix=f"run at least {max(folds, 4)} trials with distinct candidates")
    rng = np.random.default_rng(seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    pooled = _Pooled()
    for f in range(folds):
        held_keys = set(order[f::folds])
        held = {o.trial for o in obs if key(o) in held_keys}
        fit_rows = [o for o in obs if o.trial not in held]
        test_rows = _last_rows(obs, held) if at_epoch is None else [o for o in obs if o.trial in held and o.epoch == at_epoch]
        if not test_rows or len(fit_rows) < 3:
            continue
        p = PerformancePredictor(max_epochs, seed=seed, features=features, config=config).fit(fit_rows)
        pr = p.predict(np.stack([o.vector for o in test_rows]), np.asarray([o.epoch for o in test_rows]))
        for m in PREDICTED:
            pooled.pred[m] += pr[m].tolist()
            pooled.true[m] += [o.metrics[m] for o in test_rows]
        pooled.test += [o.metrics.get("test_accuracy", float("nan")) for o in test_rows]
    n = len(pooled.true["accuracy"])
    out: dict = {"trials": n, "at_epoch": at_epoch}
    for m in PREDICTED:
        out[m] = float(spearmanr(pooled.pred[m], pooled.true[m]).statistic) if n >= 3 else float("nan")
    if n >= 3:
        acc, pred = np.asarray(pooled.true["accuracy"]), np.asarray(pooled.pred["accuracy"])
        null = np.asarray([spearmanr(rng.permutation(pred), acc).statistic for _ in range(permutations)])
        null = np.nan_to_num(null, nan=0.0)
        out["accuracy_null95"] = float(np.quantile(null, 0.95))
        out["accuracy_p"] = float((1 + np.sum(null >= out["accuracy"])) / (1 + permutations))
        q75, q25 = np.percentile(acc, [75, 25])
        out["accuracy_iqr"] = float(q75 - q25)
        test = np.asarray(pooled.test)
        if np.isfinite(test).all():
            out["val_test_spearman"] = float(spearmanr(acc, test).statistic)
    return out
