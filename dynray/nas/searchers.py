"""The built-in searchers (Ray Tune used as a library; Tune is imported only when a plan is
built, so validating a config does not load it).

Each searcher registered in :data:`dynray.nas.config.SEARCHERS` turns a
:class:`~dynray.nas.config.NASConfig` into a
:class:`SearchPlan`: the Tune trainable, the search algorithm, the ``param_space`` and the
number of samples. Register new ones with ``@register_searcher("name")``; unknown names are
refused with the close matches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from dynray.nas.config import NASConfig, register_searcher
from dynray.nas.space import default_candidate
from dynray.nas.trainable import REFERENCE_KEY, TrialSettings

__all__ = ["SearchPlan", "darts_trainable"]


@dataclass(frozen=True)
class SearchPlan:
    trainable: Callable
    search_alg: Any  # a Tune Searcher, or None for the default variant generator
    param_space: dict
    num_samples: int
    uses_reference: bool
    params: dict = field(default_factory=dict)  # extra keyword arguments of the trainable (tune.with_parameters)


def _reference(cfg: NASConfig) -> list[dict]:
    if not cfg.include_default:
        return []
    return [{**default_candidate(cfg.space.max_stages).to_dict(), REFERENCE_KEY: True}]


@register_searcher("random")
def _random(cfg: NASConfig, settings: TrialSettings) -> SearchPlan:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from dynray.nas.trainable import nas_trainable

    # Tune applies max_concurrent_trials only to a Searcher; a variant generator takes its own limit
    alg = BasicVariantGenerator(points_to_evaluate=_reference(cfg) or None, random_state=cfg.seed, max_concurrent=cfg.concurrency)
    return SearchPlan(nas_trainable, alg, {**cfg.space.tune_space(), REFERENCE_KEY: False}, cfg.trials, cfg.include_default)


@register_searcher("evolution")
def _evolution(cfg: NASConfig, settings: TrialSettings) -> SearchPlan:
    from dynray.nas.evolution_searcher import EvolutionSearcher
    from dynray.nas.proxies import CandidateFeatures, ProxyConfig
    from dynray.nas.trainable import nas_trainable

    features = CandidateFeatures(cfg.space, ProxyConfig(dataset=cfg.dataset, data_root=cfg.data_root, seed=cfg.seed))
    alg = EvolutionSearcher(cfg.space, metric="score", mode="max", cfg=replace(cfg.evolution, seed=cfg.seed), objective=cfg.objective, max_epochs=cfg.epochs, seeds=_reference(cfg), features=features)
    return SearchPlan(nas_trainable, alg, {}, cfg.trials, cfg.include_default)


def darts_trainable(config: dict, settings: TrialSettings, darts: Any) -> None:
    """DARTS as a Tune trainable: search the supernet, discretise, then train and report the
    derived candidate exactly like every other trial (:func:`train_and_report`)."""
    from dynray.nas.darts import darts_search
    from dynray.nas.trainable import train_split, train_and_report

    res = darts_search(train_split(settings), settings.space, replace(darts, seed=int(config["darts_seed"])))
    info = {"darts": {"alphas": res.alphas, "history": res.history, "search_seconds": res.seconds}}
    train_and_report(res.candidate, settings, reference=False, info=info, extra_metrics={"darts_search_seconds": res.seconds})


@register_searcher("darts")
def _darts(cfg: NASConfig, settings: TrialSettings) -> SearchPlan:
    from ray import tune

    seeds = tune.grid_search([cfg.seed + i for i in range(cfg.trials)])
    return SearchPlan(darts_trainable, None, {"darts_seed": seeds}, 1, False, params={"darts": cfg.darts})
