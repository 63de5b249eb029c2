"""The evolutionary architecture searcher as a Ray Tune ``Searcher`` (Ray Tune used as a
library). The algorithm and its knobs are described in :mod:`dynray.nas.evolution`."""

from __future__ import annotations

import logging
import pickle
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ray.tune.search import Searcher

from dynray.errors import ConfigError
from dynray.nas.evolution import EvolutionConfig
from dynray.nas.objectives import ObjectiveConfig, score
from dynray.nas.pareto import pareto_ranks
from dynray.nas.predictor import Features, Observation, PerformancePredictor
from dynray.nas.space import Candidate, SearchSpace

__all__ = ["EvolutionSearcher"]
log = logging.getLogger(__name__)


@dataclass
class _Member:
    trial: str
    candidate: Candidate
    vector: np.ndarray
    result: dict
    order: int  # finish order


class EvolutionSearcher(Searcher):
    """See the module docstring. ``metric``/``mode`` go through the constructor: Tune calls
    ``set_search_properties`` only when the Tuner has a non-empty ``param_space``."""

    def __init__(
        self, space: SearchSpace, *, metric: str = "score", mode: str = "max", cfg: EvolutionConfig = EvolutionConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(), max_epochs: int = 1, seeds: Sequence[dict] = (),
        features: Features | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.space, self.cfg, self.objective, self.max_epochs = space, cfg, objective, max_epochs
        self.rng = random.Random(cfg.seed)
        self.queue: list[dict] = [dict(s) for s in seeds]  # configs to suggest first (the reference)
        self.live: dict[str, tuple[Candidate, dict]] = {}
        self.members: list[_Member] = []
        self.failed: list[str] = []
        self.observations: list[Observation] = []
        self.suggested = 0
        self.prescreened = 0
        self.seen: set[tuple[float, ...]] = set()
        self.predictor: PerformancePredictor | None = None
        self.features = features  # the predictor's inputs (None: the raw encoding)

    # -- Tune's Searcher API -----------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | None:
        extra: dict = {}
        if self.queue:
            config = self.queue.pop(0)
            extra = {k: v for k, v in config.items() if k not in Candidate.__dataclass_fields__}
            cand = Candidate.from_dict({k: v for k, v in config.items() if k in Candidate.__dataclass_fields__})
        elif len(self.members) + len(self.live) < self.cfg.population or len(self.members) < 2:
            cand = self._fresh(lambda: self.space.sample(self.rng))
        else:
            cand = self._offspring()
        try:
            self.seen.add(self._key(self.space.encode(cand)))
        except ConfigError:  # a seed outside the space: its trial fails and is recorded as failed
            pass
        self.live[trial_id] = (cand, extra)
        self.suggested += 1
        return {**cand.to_dict(), **extra}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live and all(m in result for m in ("accuracy", "macs", "latency_ms")):
            cand, _ = self.live[trial_id]
            self.observations.append(Observation(trial_id, self.space.encode(cand), int(result.get("epoch", result.get("training_iteration", 1))), {m: float(result[m]) for m in ("accuracy", "macs", "latency_ms")}))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entry = self.live.pop(trial_id, None)
        if entry is None:
            return
        cand, _ = entry
        if error or not result or self.metric not in result:
            self.failed.append(trial_id)
            return
        self.members.append(_Member(trial_id, cand, self.space.encode(cand), dict(result), len(self.members)))
        self._refit()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    # -- evolution -----------------------------------------------------------------------
    @staticmethod
    def _key(v: np.ndarray) -> tuple[float, ...]:
        return tuple(np.round(v, 4).tolist())

    def _fresh(self, make) -> Candidate:
        """A candidate not suggested before (up to 50 tries, then the last one anyway)."""
        cand = make()
        for _ in range(50):
            if self._key(self.space.encode(cand)) not in self.seen:
                break
            cand = make()
        return cand

    def pool(self) -> list[_Member]:
        """Elites (best ever) + the most recent finished trials."""
        ranked = sorted(self.members, key=self._fitness_key(self.members), reverse=True)
        elites = ranked[: self.cfg.elites]
        recent = [m for m in sorted(self.members, key=lambda m: m.order, reverse=True) if m not in elites]
        return elites + recent[: self.cfg.population - len(elites)]

    def _fitness_key(self, group: list[_Member]):
        """Sort key (higher is better): (−Pareto rank within ``group``, signed metric)."""
        sign = 1.0 if self.mode == "max" else -1.0
        if all("accuracy" in m.result and "macs" in m.result for m in group):
            ranks = pareto_ranks([(m.result["accuracy"], m.result["macs"]) for m in group])
            rank_of = {id(m): r for m, r in zip(group, ranks, strict=True)}
        else:
            rank_of = {id(m): 0 for m in group}
        return lambda m: (-rank_of.get(id(m), 0), sign * float(m.result[self.metric]))

    def _tournament(self, pool: list[_Member]) -> _Member:
        picks = self.rng.sample(pool, min(self.cfg.tournament, len(pool)))
        return max(picks, key=self._fitness_key(pool))

    def _breed(self, pool: list[_Member]) -> np.ndarray:
        a = self._tournament(pool).vector
        child = a.copy()
        if self.rng.random() < self.cfg.crossover:
            b = self._tournament(pool).vector
            take = np.asarray([self.rng.random() < 0.5 for _ in range(len(a))])
            child = np.where(take, b, a)
        for i, n in enumerate(self.space.gene_choices()):
            if self.rng.random() >= self.cfg.mutation:
                continue
            if n is None:
                child[i] = float(np.clip(child[i] + self.rng.gauss(0.0, self.cfg.sigma), 0.0, 1.0))
            elif n > 1:
                cur = int(round(child[i] * (n - 1)))
                child[i] = self.rng.choice([j for j in range(n) if j != cur]) / (n - 1)
        return child

    def _offspring(self) -> Candidate:
        pool = self.pool()
        if self.predictor is None:
            return self._fresh(lambda: self.space.decode(self._breed(pool)))
        kids: list[Candidate] = []
        for _ in range(self.cfg.screen):
            kid = self._fresh(lambda: self.space.decode(self._breed(pool)))
            if self._key(self.space.encode(kid)) not in self.seen:
                kids.append(kid)
        if not kids:
            return self._fresh(lambda: self.space.decode(self._breed(pool)))
        pred = self.predictor.predict(np.stack([self.space.encode(k) for k in kids]))
        scores = [score(float(a), float(m), self.objective) for a, m in zip(pred["accuracy"], pred["macs"], strict=True)]
        self.prescreened += 1
        return kids[int(np.argmax(scores))]

    def _refit(self) -> None:
        if not self.cfg.predictor_min or len(self.members) < self.cfg.predictor_min or len(self.observations) < 3:
            return
        try:
            self.predictor = PerformancePredictor(self.max_epochs, seed=self.cfg.seed, features=self.features).fit(self.observations)
        except Exception:  # a failed fit must not stop the search: breed without screening
            log.exception("performance predictor fit failed; breeding without pre-screening")
            self.predictor = None
