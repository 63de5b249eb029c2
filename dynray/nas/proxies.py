"""Cheap per-candidate features for the performance predictor: size and zero-cost proxies.

Everything here is computed from the candidate alone (no training): its MACs and parameter
count, structural summaries of the genes (depth, stages, log learning rate, ...), and three
zero-cost proxies scored on the network *at initialisation* on one fixed training batch:

- ``synflow``: log of Σ|θ ⊙ ∂R/∂θ| with R the sum of the last exit's output for an all-ones
  input, on |θ| in float64 (Tanaka et al. 2020, data-free);
- ``grad_norm``: log of the norm of the multi-exit cross-entropy gradient on the batch;
- ``jacob_cov``: the Jacobian-covariance score of Mellor et al. 2021 (how differently the
  network responds to different inputs of the batch).

A candidate costs a few tens of milliseconds on one CPU thread; :class:`CandidateFeatures`
caches by encoding, so the evolutionary searcher can pre-screen offspring with it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dynray.errors import ConfigError
from dynray.nas.space import Candidate, SearchSpace

__all__ = ["STRUCTURAL", "ZERO_COST", "DEFAULT_COLUMNS", "ProxyConfig", "structural_features", "zero_cost_proxies", "CandidateFeatures"]

STRUCTURAL = ("log_macs", "log_macs_exit1", "log_params", "num_stages", "depth", "log_width_mean", "kernel_mean", "exit_hidden", "moe", "log_lr", "log_wd")
"""Features read off the candidate and its built network (no data)."""
ZERO_COST = ("synflow", "grad_norm", "jacob_cov")
"""Proxies scored at initialisation on one training batch."""
DEFAULT_COLUMNS = ("log_macs", "log_macs_exit1", "log_params", "depth", "log_width_mean", "synflow", "grad_norm", "jacob_cov")
"""The predictor's default inputs: size and the zero-cost proxies. Hyperparameter genes and
the raw encoding were no better on held-out trials of real runs (README, NAS section), and
with 20-50 trials every extra input costs the regressors more than it tells them."""


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """Which features :class:`CandidateFeatures` computes, and on what."""

    dataset: str = "mnist-5k"
    """Dataset whose input shape the networks are built for (and whose training split gives the batch)."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""
    batch: int = 32
    """Samples in the one batch the data-dependent proxies use (32: about 70 ms a candidate on one thread)."""
    seed: int = 0
    """Seeds the initialisation and the batch (every candidate sees the same batch)."""
    columns: tuple[str, ...] = DEFAULT_COLUMNS
    """Features to compute, in this order (from STRUCTURAL and ZERO_COST)."""

    def __post_init__(self) -> None:
        if self.batch < 2:
            raise ConfigError("the proxy batch needs at least 2 samples", got=self.batch, fix="use e.g. batch=32")
        unknown = set(self.columns) - set(STRUCTURAL) - set(ZERO_COST)
        if not self.columns or unknown or len(set(self.columns)) != len(self.columns):
            raise ConfigError("unknown, repeated or no proxy columns", got=self.columns, fix=f"choose each at most once from {STRUCTURAL + ZERO_COST}")

    @property
    def names(self) -> tuple[str, ...]:
        return self.columns

    @property
    def zero_cost(self) -> tuple[str, ...]:
        return tuple(z for z in self.columns if z in ZERO_COST)


def _build(c: Candidate, dataset: str, seed: int) -> torch.nn.Module:
    from dynray.models import build
    from dynray.models.defaults import default_model_config

    torch.manual_seed(seed)
    return build(c.model_config(default_model_config(dataset)))


def structural_features(c: Candidate, model: torch.nn.Module | None = None, *, dataset: str = "mnist-5k") -> dict[str, float]:
    """Size and shape of candidate ``c`` (``model``: its built network, built here if None)."""
    model = model if model is not None else _build(c, dataset, 0)
    k = c.num_stages
    prof = model.mac_profile  # type: ignore[attr-defined]
    return {
        "log_macs": math.log(prof.full),
        "log_macs_exit1": math.log(prof.cumulative[0]),
        "log_params": math.log(sum(p.numel() for p in model.parameters())),
        "num_stages": float(k),
        "depth": float(sum(c.layers[:k])),
        "log_width_mean": float(np.mean(np.log(c.widths[:k]))),
        "kernel_mean": float(np.mean(c.kernels[:k])),
        "exit_hidden": float(c.exit_hidden),
        "moe": float(c.moe),
        "log_lr": math.log(c.lr),
        "log_wd": math.log(c.weight_decay),
    }


def _synflow(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    for p in net.parameters():
        p.grad = None
    out = net(torch.ones(1, *shape, dtype=torch.float64))[-1]
    out.sum().backward()
    total = sum(float((p.detach() * p.grad).abs().sum()) for p in net.parameters() if p.grad is not None)
    return math.log(total + 1e-30)


def _grad_norm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = sum(torch.nn.functional.cross_entropy(z, y) for z in model(x))
    loss.backward()  # type: ignore[union-attr]
    sq = sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return math.log(math.sqrt(sq) + 1e-12)


def _jacob_cov(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.train()
    xg = x.clone().requires_grad_(True)
    out = model(xg)[-1]
    (jac,) = torch.autograd.grad(out.sum(), xg)
    j = jac.reshape(len(x), -1).double().numpy()
    corr = np.corrcoef(j)
    corr = np.nan_to_num(corr, nan=0.0)
    eig = np.linalg.eigvalsh(corr)
    k = 1e-5
    return float(-np.sum(np.log(np.abs(eig) + k) + 1.0 / (np.abs(eig) + k))) / len(x)


def zero_cost_proxies(c: Candidate, x: torch.Tensor, y: torch.Tensor, *, dataset: str = "mnist-5k", seed: int = 0, which: Sequence[str] = ZERO_COST) -> dict[str, float]:
    """Zero-cost proxies of ``c`` at initialisation (seeded) on the batch ``x``, ``y``, plus its
    structural features."""
    model = _build(c, dataset, seed)
    out = structural_features(c, model, dataset=dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if "synflow" in which:
            out["synflow"] = _synflow(model, tuple(x.shape[1:]))
        if "grad_norm" in which:
            torch.manual_seed(seed)
            out["grad_norm"] = _grad_norm(model, x, y)
        if "jacob_cov" in which:
            torch.manual_seed(seed)
            out["jacob_cov"] = _jacob_cov(model, x)
    finally:
        torch.set_num_threads(threads)
    return {k: (v if math.isfinite(v) else 0.0) for k, v in out.items()}


@dataclass
class CandidateFeatures:
    """Encoding vectors -> feature rows (:meth:`ProxyConfig.names` columns), cached by vector.

    Callable, so it plugs into :class:`~dynray.nas.predictor.PerformancePredictor` as its
    ``features``. The batch is loaded on first use.
    """

    space: SearchSpace
    cfg: ProxyConfig = field(default_factory=ProxyConfig)
    _cache: dict = field(default_factory=dict, repr=False)
    _batch: tuple | None = field(default=None, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return self.cfg.names

    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batch is None:
            from dynray.data import load_dataset

            train = load_dataset(self.cfg.dataset, "train", root=self.cfg.data_root)
            idx = np.random.default_rng(self.cfg.seed).choice(len(train.labels), size=min(self.cfg.batch, len(train.labels)), replace=False)
            sel = torch.as_tensor(idx, dtype=torch.long)
            self._batch = (train.images[sel].float(), train.labels[sel].long())
        return self._batch

    def candidate(self, c: Candidate) -> np.ndarray:
        key = tuple(np.round(self.space.encode(c), 6).tolist())
        if key not in self._cache:
            if self.cfg.zero_cost:
                x, y = self._data()
                d = zero_cost_proxies(c, x, y, dataset=self.cfg.dataset, seed=self.cfg.seed, which=self.cfg.zero_cost)
            else:
                d = structural_features(c, dataset=self.cfg.dataset)
            self._cache[key] = np.asarray([d[n] for n in self.names], dtype=np.float64)
        return self._cache[key]

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(vectors)
        return np.stack([self.candidate(self.space.decode(v)) for v in vectors])
