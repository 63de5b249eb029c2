"""A/B traffic split between served model versions, with per-version counts."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from dynray.errors import ConfigError, RequestError

__all__ = ["TrafficSplit"]


@dataclass(frozen=True, kw_only=True)
class TrafficSplit:
    """Sends each request to one version with probability proportional to its weight."""

    versions: tuple[str, ...]
    """Concrete registry refs (``name:vN``)."""
    weights: tuple[float, ...]
    """Traffic share per version (normalised; zero keeps a version reachable only on request)."""
    counts: Counter = field(default_factory=Counter, compare=False)
    """Requests answered per version by this process (mutable tally; the split itself is frozen)."""

    def __post_init__(self) -> None:
        if not self.versions or len(self.versions) != len(self.weights):
            raise ConfigError("one weight per version is needed", got=(self.versions, self.weights), fix="e.g. models [a, b] with weights [0.9, 0.1]")
        if len(set(self.versions)) != len(self.versions):
            raise ConfigError("versions must be distinct", got=self.versions, fix="list each model once")
        if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ConfigError("weights must be >= 0 with a positive sum", got=self.weights, fix="finite shares such as [0.7, 0.3]")

    @classmethod
    def of(cls, versions: list[str], weights: list[float] | None) -> TrafficSplit:
        ws = weights if weights is not None else [1.0] + [0.0] * (len(versions) - 1)
        return cls(versions=tuple(versions), weights=tuple(float(w) for w in ws))

    @property
    def shares(self) -> dict[str, float]:
        total = sum(self.weights)
        return {v: w / total for v, w in zip(self.versions, self.weights, strict=True)}

    def pick(self, requested: str | None = None, rng: random.Random | None = None) -> str:
        """The version to serve: ``requested`` if given (must be served), else a weighted draw."""
        if requested is not None:
            if requested not in self.versions:
                raise RequestError("model_version is not served here", status=422, got=requested, fix=f"use one of {', '.join(self.versions)} or omit it")
            return requested
        return (rng or random).choices(self.versions, weights=self.weights, k=1)[0]

    def record(self, version: str) -> None:
        self.counts[version] += 1

    def describe(self) -> dict:
        """The ``GET /v1/models`` body."""
        return {"versions": list(self.versions), "split": self.shares, "requests": {v: self.counts.get(v, 0) for v in self.versions}}
