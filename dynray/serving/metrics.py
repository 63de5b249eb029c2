"""Metric names, kinds and tag keys, defined once for every part of the serving graph.

The ingress, each edge/cloud device and each MoE expert replica record through a
:class:`MetricsSink`. On Ray, ``actors/metrics.py`` maps the specs below onto
``ray.util.metrics`` and adds a ``node`` tag (the replica's Ray node); Ray's Prometheus
endpoint then exports each one as ``ray_<name>`` (a counter with the ``_total`` suffix kept,
a histogram as ``_bucket``/``_sum``/``_count``). Tests use :class:`MemoryMetrics`, which
checks names and tag sets the way Ray does. ``cluster/grafana-dashboard.json`` queries
exactly these series, and a test checks every query against a live scrape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from dynray.errors import UnknownNameError

__all__ = [
    "RESPONSES", "REQUESTS", "SAMPLES", "EXITS", "ESCALATED", "DEGRADED", "FAILOVERS", "REJECTED", "ERRORS", "RATE_LIMITED",
    "LATENCY_MS", "TIER_LATENCY_MS", "FLAGS", "DRIFT_SCORE", "DRIFT_ALARMS", "DEVICE_EXITS", "BATCH_SIZE", "REPLICA_LATENCY_MS",
    "EXPERT_TOKENS", "FEEDBACK_LABELS", "LIVE_ACCURACY", "RL_WEIGHT", "TAG_RESULT", "TAG_VERSION", "TAG_PATH", "TAG_STATUS", "TAG_TIER", "TAG_EXIT", "TAG_EXPERT", "TAG_NODE", "TAG_DETECTOR",
    "TAG_ACTION", "LATENCY_BOUNDARIES_MS", "BATCH_BOUNDARIES", "Spec", "SPECS", "COUNTERS", "HISTOGRAMS", "GAUGES", "exported_name",
    "MetricsSink", "MemoryMetrics",
]

TAG_VERSION, TAG_PATH, TAG_STATUS, TAG_TIER = "model_version", "path", "status", "tier"
TAG_EXIT, TAG_EXPERT, TAG_DETECTOR, TAG_ACTION = "exit", "expert", "detector", "action"
TAG_NODE = "node"
TAG_RESULT = "result"  # a labelled answer: "correct" or "wrong"
"""Added by the Ray sink to every series: the Ray node id (first 12 hex digits) of the replica."""
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# -- the ingress ---------------------------------------------------------------------
RESPONSES = "dynray_responses_total"  # every /v1/predict answer, tags: status
REQUESTS = "dynray_requests_total"  # answered /v1/predict requests, tags: version, path
SAMPLES = "dynray_samples_total"  # samples answered, tags: version, tier
EXITS = "dynray_exits_total"  # samples answered at each exit, tags: version, tier, exit
ESCALATED = "dynray_escalated_samples_total"  # samples the edge handed to the cloud, tags: version
DEGRADED = "dynray_degraded_samples_total"  # samples answered by an edge exit because the cloud was down, tags: version
FAILOVERS = "dynray_unavailable_total"  # requests answered 503 (no tier reachable)
REJECTED = "dynray_rejected_total"  # 4xx answers, tags: status
ERRORS = "dynray_errors_total"  # 5xx answers (500 internal error, 503 no tier), tags: status
RATE_LIMITED = "dynray_rate_limited_total"  # 429 answers of the global limiter
LATENCY_MS = "dynray_request_latency_ms"  # ingress-side latency of an answered request, tags: version
TIER_LATENCY_MS = "dynray_tier_call_latency_ms"  # one ingress -> device call, as the ingress saw it, tags: tier
FLAGS = "dynray_security_flags_total"  # detector flags raised, tags: detector, action
DRIFT_SCORE = "dynray_drift_score"  # the drift detector's latest score (largest KS statistic), tags: version
DRIFT_ALARMS = "dynray_drift_alarms_total"  # drift alarms raised (one per episode), tags: version
FEEDBACK_LABELS = "dynray_feedback_labels_total"  # labelled samples (POST /v1/feedback), tags: version, exit, result
LIVE_ACCURACY = "dynray_live_accuracy"  # accuracy of the latest labelled answers of an exit, tags: version, exit
RL_WEIGHT = "dynray_hybrid_rl_weight"  # the hybrid router's trust in its policy, learnt from labels, tags: version
# -- device and expert replicas ---------------------------------------------------------
DEVICE_EXITS = "dynray_device_exits_total"  # samples that left a device at an exit, or "continue"d, tags: version, tier, exit
BATCH_SIZE = "dynray_batch_size"  # samples per forward of a device or expert replica, tags: tier
REPLICA_LATENCY_MS = "dynray_replica_latency_ms"  # one call inside a device or expert replica, tags: tier
EXPERT_TOKENS = "dynray_expert_tokens_total"  # tokens an expert replica processed, tags: version, expert


@dataclass(frozen=True)
class Spec:
    """One series: kind, help text, tag keys (without ``node``) and, for histograms, buckets."""

    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


_C, _G, _H = "counter", "gauge", "histogram"
SPECS: dict[str, Spec] = {
    RESPONSES: Spec(_C, "predict answers by HTTP status", (TAG_STATUS,)),
    REQUESTS: Spec(_C, "answered predict requests", (TAG_VERSION, TAG_PATH)),
    SAMPLES: Spec(_C, "answered samples", (TAG_VERSION, TAG_TIER)),
    EXITS: Spec(_C, "answered samples by the exit they left at", (TAG_VERSION, TAG_TIER, TAG_EXIT)),
    ESCALATED: Spec(_C, "samples escalated to the cloud", (TAG_VERSION,)),
    DEGRADED: Spec(_C, "samples answered degraded", (TAG_VERSION,)),
    FAILOVERS: Spec(_C, "requests answered 503", ()),
    REJECTED: Spec(_C, "4xx answers", (TAG_STATUS,)),
    ERRORS: Spec(_C, "5xx answers", (TAG_STATUS,)),
    RATE_LIMITED: Spec(_C, "requests refused 429 by the global rate limit", ()),
    LATENCY_MS: Spec(_H, "ingress latency of an answered request", (TAG_VERSION,), tuple(LATENCY_BOUNDARIES_MS)),
    TIER_LATENCY_MS: Spec(_H, "latency of one device call seen from the ingress", (TAG_TIER,), tuple(LATENCY_BOUNDARIES_MS)),
    FLAGS: Spec(_C, "detector flags raised", (TAG_DETECTOR, TAG_ACTION)),
    DRIFT_SCORE: Spec(_G, "drift score: the largest two-sample KS statistic of the window against the calibration reference", (TAG_VERSION,)),
    DRIFT_ALARMS: Spec(_C, "drift alarms raised", (TAG_VERSION,)),
    FEEDBACK_LABELS: Spec(_C, "labelled samples by exit and whether the answer was right", (TAG_VERSION, TAG_EXIT, TAG_RESULT)),
    LIVE_ACCURACY: Spec(_G, "accuracy of the latest labelled answers of one exit (POST /v1/feedback)", (TAG_VERSION, TAG_EXIT)),
    RL_WEIGHT: Spec(_G, "the hybrid router's trust in its policy, learnt from label feedback", (TAG_VERSION,)),
    DEVICE_EXITS: Spec(_C, "samples leaving a device at an exit, or continuing", (TAG_VERSION, TAG_TIER, TAG_EXIT)),
    BATCH_SIZE: Spec(_H, "samples per forward of a replica", (TAG_TIER,), tuple(BATCH_BOUNDARIES)),
    REPLICA_LATENCY_MS: Spec(_H, "time one call spends in a device or expert replica", (TAG_TIER,), tuple(LATENCY_BOUNDARIES_MS)),
    EXPERT_TOKENS: Spec(_C, "tokens processed by an expert replica", (TAG_VERSION, TAG_EXPERT)),
}
"""Every series, by name."""
COUNTERS = {n: s for n, s in SPECS.items() if s.kind == _C}
GAUGES = {n: s for n, s in SPECS.items() if s.kind == _G}
HISTOGRAMS = {n: s for n, s in SPECS.items() if s.kind == _H}


def exported_name(name: str) -> str:
    """The metric family name Ray's Prometheus endpoint exports ``name`` under (what
    ``prometheus_client``'s parser calls the family: a counter without ``_total``)."""
    base = f"ray_{name}"
    return base.removesuffix("_total") if SPECS[name].kind == _C else base


class MetricsSink(Protocol):
    """Where serving code records its metrics."""

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None: ...

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None: ...

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None: ...


def _check(name: str, tags: Mapping[str, str] | None, kind: str) -> tuple[tuple[str, str], ...]:
    known = {n: s for n, s in SPECS.items() if s.kind == kind}
    if name not in known:
        raise UnknownNameError(f"{kind} metric", name, known)
    keys = set(known[name].tags)
    got = set(tags or {})
    if got != keys:  # ray.util.metrics refuses missing or unknown tag keys too
        raise UnknownNameError("tag set", ",".join(sorted(got)), [",".join(sorted(keys))], fix=f"{name} takes tags {sorted(keys)}")
    return tuple(sorted((tags or {}).items()))


class MemoryMetrics:
    """A :class:`MetricsSink` that keeps totals in memory, checking names and tags like Ray does."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self.observations: list[tuple[str, tuple[tuple[str, str], ...], float]] = []
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        if value <= 0:  # Ray raises on it too ("value must be >0")
            raise ValueError(f"{name}: a counter increment must be > 0, got {value}")
        self.counts[(name, _check(name, tags, _C))] += value

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self.observations.append((name, _check(name, tags, _H), value))

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self.gauges[(name, _check(name, tags, _G))] = value

    def count(self, name: str, **tags: str) -> float:
        """Total of ``name`` over every series whose tags include ``tags``."""
        return sum(v for (n, ts), v in self.counts.items() if n == name and set(tags.items()) <= set(ts))

    def observed(self, name: str, **tags: str) -> list[float]:
        """Every value observed into histogram ``name`` under series whose tags include ``tags``."""
        return [v for n, ts, v in self.observations if n == name and set(tags.items()) <= set(ts)]
