"""Metric names and tag keys, defined once (exported by Serve replicas as ``ray_<name>``).

The ingress logic records through a :class:`MetricsSink`: on Serve, ``actors/app.py`` maps
it onto ``ray.serve.metrics`` counters and histograms built from :data:`COUNTERS` and
:data:`HISTOGRAMS`; tests use :class:`MemoryMetrics`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Protocol

from dynray.errors import UnknownNameError

__all__ = [
    "REQUESTS", "SAMPLES", "ESCALATED", "DEGRADED", "FAILOVERS", "REJECTED", "ERRORS", "LATENCY_MS", "FLAGS",
    "TAG_VERSION", "TAG_PATH", "TAG_STATUS", "TAG_TIER", "TAG_DETECTOR", "TAG_ACTION", "LATENCY_BOUNDARIES_MS",
    "COUNTERS", "HISTOGRAMS", "MetricsSink", "MemoryMetrics",
]

REQUESTS = "dynray_requests_total"  # answered /v1/predict requests, tags: version, path
SAMPLES = "dynray_samples_total"  # samples answered, tags: version, tier
ESCALATED = "dynray_escalated_samples_total"  # samples the edge handed to the cloud, tags: version
DEGRADED = "dynray_degraded_samples_total"  # samples answered by an edge exit because the cloud was down, tags: version
FAILOVERS = "dynray_unavailable_total"  # requests answered 503 (no tier reachable)
REJECTED = "dynray_rejected_total"  # 4xx answers, tags: status
ERRORS = "dynray_errors_total"  # 5xx answers (500 internal error, 503 no tier), tags: status
LATENCY_MS = "dynray_request_latency_ms"  # ingress-side latency histogram, tags: version
FLAGS = "dynray_security_flags_total"  # detector flags raised, tags: detector, action

TAG_VERSION, TAG_PATH, TAG_STATUS, TAG_TIER = "model_version", "path", "status", "tier"
TAG_DETECTOR, TAG_ACTION = "detector", "action"
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    REQUESTS: ("answered predict requests", (TAG_VERSION, TAG_PATH)),
    SAMPLES: ("answered samples", (TAG_VERSION, TAG_TIER)),
    ESCALATED: ("samples escalated to the cloud", (TAG_VERSION,)),
    DEGRADED: ("samples answered degraded", (TAG_VERSION,)),
    FAILOVERS: ("requests answered 503", ()),
    REJECTED: ("4xx answers", (TAG_STATUS,)),
    ERRORS: ("5xx answers", (TAG_STATUS,)),
    FLAGS: ("detector flags raised", (TAG_DETECTOR, TAG_ACTION)),
}
"""name -> (description, tag keys)."""
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], list[float]]] = {
    LATENCY_MS: ("ingress latency", (TAG_VERSION,), LATENCY_BOUNDARIES_MS),
}
"""name -> (description, tag keys, bucket boundaries)."""


class MetricsSink(Protocol):
    """Where the ingress logic records its metrics."""

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None: ...

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None: ...


def _check(name: str, tags: Mapping[str, str] | None, known: Mapping[str, tuple]) -> tuple[tuple[str, str], ...]:
    if name not in known:
        raise UnknownNameError("metric", name, known)
    keys = set(known[name][1])
    got = set(tags or {})
    if got != keys:  # ray.serve.metrics refuses missing or unknown tag keys too
        raise UnknownNameError("tag set", ",".join(sorted(got)), [",".join(sorted(keys))], fix=f"{name} takes tags {sorted(keys)}")
    return tuple(sorted((tags or {}).items()))


class MemoryMetrics:
    """A :class:`MetricsSink` that keeps totals in memory, checking names and tags like Ray does."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.observations: list[tuple[str, tuple[tuple[str, str], ...], float]] = []

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        self.counts[(name, _check(name, tags, COUNTERS))] += value

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self.observations.append((name, _check(name, tags, HISTOGRAMS), value))

    def count(self, name: str, **tags: str) -> float:
        """Total of ``name`` over every series whose tags include ``tags``."""
        return sum(v for (n, ts), v in self.counts.items() if n == name and set(tags.items()) <= set(ts))
