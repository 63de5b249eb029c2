"""Neural architecture search: the space and its encoding, Tune searchers (random,
evolutionary, DARTS), ASHA, the performance predictor and the Pareto front.

Searchers register in :mod:`dynray.nas.searchers`, imported here explicitly so the registry
is complete wherever ``dynray.nas`` is imported (Ray workers import only what they are told).
"""

from dynray.nas import searchers as _searchers  # noqa: F401  (registers random, evolution, darts)
from dynray.nas.objectives import ObjectiveConfig
from dynray.nas.config import NASConfig, NASResult, TrialRecord
from dynray.nas.search import run_search
from dynray.nas.space import Candidate, SearchSpace, default_candidate

__all__ = ["Candidate", "SearchSpace", "default_candidate", "ObjectiveConfig", "NASConfig", "NASResult", "TrialRecord", "run_search"]
