"""The Ray Tune function trainable of architecture search (Ray Tune used as a library).

One trial trains one candidate in its own process on one CPU: the same epoch loop as
``dynray train`` (:func:`dynray.training.train_epoch`: multi-exit loss, self-distillation,
annealed exit weights, MoE balance losses), without DDP. After every epoch it calibrates
and measures the network (:mod:`dynray.nas.objectives`) and reports to Tune, with a
checkpoint (weights, calibrated rule, candidate) after the first and the last epoch, so ASHA
can stop it at any rung and the completed trials can be registered afterwards.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from dynray.data import Split, load_dataset
from dynray.errors import ConfigError
from dynray.models import DynamicNet, build
from dynray.nas.objectives import ObjectiveConfig, measure
from dynray.nas.space import Candidate, SearchSpace
from dynray.models.defaults import default_model_config
from dynray.training import TrainConfig, make_optimizer, train_epoch

__all__ = ["TrialSettings", "REFERENCE_KEY", "nas_trainable", "train_and_report", "train_split", "train_config_for", "build_candidate", "WEIGHTS_FILE", "RULE_FILE"]
log = logging.getLogger(__name__)

REFERENCE_KEY = "reference"
"""Config key that marks the foundation-default reference trial (never stopped early)."""
WEIGHTS_FILE = "model.safetensors"
RULE_FILE = "trial.json"


@dataclass(frozen=True, kw_only=True)
class TrialSettings:
    """What every trial of one search shares (passed with ``tune.with_parameters``)."""

    dataset: str = "mnist-5k"
    """Dataset name."""
    epochs: int = 20
    """Epochs of a trial that is never stopped (ASHA's max_t); the LR schedule spans them."""
    batch_size: int = 64
    """Samples per step."""
    seed: int = 0
    """Seeds model init, data order and augmentation (the same for every trial)."""
    train_limit: int | None = None
    """Use only the first N training samples (tiny test runs); None = the whole split."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""
    space: SearchSpace = field(default_factory=SearchSpace)
    """The search space (candidates are checked against it)."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """How each report is measured."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("trial epochs and batch_size must be >= 1", got=(self.epochs, self.batch_size), fix="e.g. --epochs 9")
        if self.train_limit is not None and self.train_limit < self.batch_size:
            raise ConfigError("train_limit must hold at least one batch", got=self.train_limit, fix=f"use >= {self.batch_size}, or None")


def train_config_for(c: Candidate, s: TrialSettings) -> TrainConfig:
    """The training run of candidate ``c``: the foundation's loop with its lr and weight decay."""
    model = c.model_config(default_model_config(s.dataset))
    return TrainConfig(dataset=s.dataset, model=model, epochs=s.epochs, batch_size=s.batch_size, lr=c.lr, weight_decay=c.weight_decay, seed=s.seed, workers=1, data_root=s.data_root)


def build_candidate(c: Candidate, s: TrialSettings, train: Split) -> DynamicNet:
    """Build the candidate's network with its complexity normalisation fitted on ``train``."""
    model = build(train_config_for(c, s).model_config())
    model.complexity.fit(train.images)
    return model


def _checkpoint(d: Path, model: DynamicNet, c: Candidate, rule: dict, epoch: int, info: dict) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / WEIGHTS_FILE))
    (d / RULE_FILE).write_text(json.dumps({"candidate": c.to_dict(), "rule": rule, "epoch": epoch, **info}))


def train_split(s: TrialSettings) -> Split:
    train = load_dataset(s.dataset, "train", root=s.data_root)
    if s.train_limit is not None:
        train = replace(train, images=train.images[: s.train_limit], labels=train.labels[: s.train_limit])
    return train


def train_and_report(cand: Candidate, settings: TrialSettings, *, reference: bool = False, info: dict | None = None, extra_metrics: dict | None = None) -> None:
    """Train ``cand`` for ``settings.epochs``, measuring and reporting to Tune after every epoch
    (with a checkpoint of weights, calibrated rule, candidate and ``info`` after the first and
    the last)."""
    from ray import tune

    settings.space.check(cand)
    torch.manual_seed(settings.seed)
    train = train_split(settings)
    val = load_dataset(settings.dataset, "val", root=settings.data_root)
    test = load_dataset(settings.dataset, "test", root=settings.data_root)
    tcfg = train_config_for(cand, settings)
    model = build_candidate(cand, settings, train)
    opt = make_optimizer(model, tcfg)
    steps = len(train) // tcfg.batch_size
    t0 = time.perf_counter()
    for epoch in range(tcfg.epochs):
        train_epoch(model, model, train, opt, tcfg, epoch, step0=epoch * steps)
        m = measure(model, val, test, settings.objective)
        metrics = {**m.metrics(settings.objective), **(extra_metrics or {}), "epoch": epoch + 1, REFERENCE_KEY: reference, "train_seconds": time.perf_counter() - t0}
        if epoch not in (0, tcfg.epochs - 1):
            tune.report(metrics)
            continue
        # checkpoints only after the first epoch (every trial then has one, with its candidate)
        # and the last (the weights a completed trial is registered with): per-epoch
        # checkpoints force Tune to snapshot the experiment state again and again
        with tempfile.TemporaryDirectory() as d:
            _checkpoint(Path(d), model, cand, m.rule.to_dict(), epoch + 1, info or {})
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def nas_trainable(config: dict, settings: TrialSettings) -> None:
    """The trial of the random and evolutionary searchers: ``config`` is a candidate dict
    (plus the reference flag), parsed back into a :class:`Candidate` first."""
    cfg = dict(config)
    reference = bool(cfg.pop(REFERENCE_KEY, False))
    train_and_report(Candidate.from_dict(cfg), settings, reference=reference)
