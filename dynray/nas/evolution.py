"""The evolutionary searcher's configuration, and how it searches (the Tune ``Searcher``
itself is :class:`dynray.nas.evolution_searcher.EvolutionSearcher`).

Regularized evolution (Real et al. 2019) with elitism, on the candidates' vector encoding:

- **Population**: the first ``population`` suggestions are the seeded candidates (the
  foundation default first) and then random ones. After that, the breeding pool is the
  ``elites`` best trials ever seen (elitism: they never age out) plus the most recent
  ``population − elites`` finished trials (ageing).
- **Selection**: tournaments of ``tournament`` pool members; the winner has the best Pareto
  rank on (accuracy ↑, MACs ↓) within the pool, ties broken by the scalar ``metric``.
- **Variation**: uniform crossover of two winners (probability ``crossover``), then each gene
  mutates with probability ``mutation`` (a categorical gene takes another choice, a
  log-scale gene moves by a Gaussian step).
- **Pre-screening**: once ``predictor_min`` trials have finished, ``screen`` offspring are bred
  per suggestion and the one the :class:`~dynray.nas.predictor.PerformancePredictor` scores
  best at full length is suggested.

Trials that ASHA stopped count with their truncated result (Tune reports them as complete),
which is the right penalty: they were stopped for being behind. Trials that crashed are
recorded as failed and never bred from. The searcher is plain Python over ``suggest`` /
``on_trial_result`` / ``on_trial_complete``, so a unit test can drive it without a cluster.
This module stays free of Ray imports, so building the CLI's parser does not load Tune.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynray.errors import ConfigError

__all__ = ["EvolutionConfig"]


@dataclass(frozen=True, kw_only=True)
class EvolutionConfig:
    """Knobs of the evolutionary searcher."""

    population: int = 8
    """Trials in the initial population and in the breeding pool."""
    elites: int = 2
    """Best trials that always stay in the breeding pool."""
    tournament: int = 3
    """Pool members per tournament."""
    crossover: float = 0.5
    """Probability that a child mixes two parents (uniform crossover) instead of copying one."""
    mutation: float = 0.15
    """Per-gene mutation probability."""
    sigma: float = 0.15
    """Step of a log-scale gene's mutation, in units of its normalised range."""
    screen: int = 24
    """Offspring bred per suggestion once the predictor is fitted; the best predicted is suggested."""
    predictor_min: int = 8
    """Finished trials before the predictor starts pre-screening (0 disables it)."""
    seed: int = 0
    """Seeds sampling, selection and variation."""

    def __post_init__(self) -> None:
        if self.population < 2 or not 0 <= self.elites < self.population or self.tournament < 1:
            raise ConfigError("need population >= 2, 0 <= elites < population, tournament >= 1", got=(self.population, self.elites, self.tournament), fix="e.g. population=8, elites=2, tournament=3")
        if not (0 <= self.crossover <= 1 and 0 <= self.mutation <= 1) or self.sigma <= 0 or self.screen < 1 or self.predictor_min < 0:
            raise ConfigError("crossover and mutation are probabilities; sigma > 0; screen >= 1; predictor_min >= 0", got=self, fix="e.g. crossover=0.5, mutation=0.15")
