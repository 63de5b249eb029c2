"""Annealing schedules: move a value from a permissive start to a strict end.

Training uses them for the per-exit loss weights and for the monitoring threshold.
``progress`` is in [0, 1] (epoch / (epochs - 1)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from dynray.errors import ConfigError, UnknownNameError

__all__ = ["SCHEDULES", "anneal", "anneal_vector"]


def _linear(p: float) -> float:
    return p


def _cosine(p: float) -> float:
    return 0.5 * (1.0 - math.cos(math.pi * p))


def _exponential(p: float, rate: float = 5.0) -> float:
    # 1 - e^{-rate p}, rescaled so it hits exactly 1 at p = 1: fast early, slow late.
    return (1.0 - math.exp(-rate * p)) / (1.0 - math.exp(-rate))


SCHEDULES: dict[str, Callable[[float], float]] = {"linear": _linear, "cosine": _cosine, "exponential": _exponential}


def anneal(kind: str, start: float, end: float, progress: float) -> float:
    """Value at ``progress`` in [0, 1] of a schedule from ``start`` to ``end``."""
    if kind not in SCHEDULES:
        raise UnknownNameError("schedule", kind, SCHEDULES)
    if not 0.0 <= progress <= 1.0:
        raise ConfigError("schedule progress must be in [0, 1]", got=progress, fix="pass epoch / max(1, epochs - 1)")
    return start + (end - start) * SCHEDULES[kind](progress)


def anneal_vector(kind: str, start: Sequence[float], end: Sequence[float], progress: float) -> tuple[float, ...]:
    """Element-wise :func:`anneal` for per-exit values."""
    if len(start) != len(end):
        raise ConfigError("schedule start and end need the same length", got=(len(start), len(end)), fix="give one value per exit")
    return tuple(anneal(kind, s, e, progress) for s, e in zip(start, end, strict=True))
