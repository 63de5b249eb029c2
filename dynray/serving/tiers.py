"""What the ingress knows about each tier: its circuit breaker, load reports and call time.

The breaker counts failed device calls once per *wave* (:func:`count_failures`): a failed
call counts only if it was sent at or after the previous counted failure was seen. The
calls already in flight when a replica dies, or the requests the ingress coalesced into one
device call, are one piece of evidence, not one per request, so one dead replica of several
never trips the breaker on its own. The state is kept as events (who saw which failure
when), so several ingress replicas can pool theirs (:mod:`dynray.serving.routing_state`).
Pure Python; :mod:`dynray.serving.failover` drives it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from dynray.serving.partition import DeviceReply
from dynray.serving.scheduling import LoadReport

__all__ = ["BreakerSettings", "FailureEvent", "count_failures", "TierView", "CallTime", "MAX_EVENTS"]

MAX_EVENTS = 64
"""Failure events kept per tier (only those since the last success matter)."""


class BreakerSettings(Protocol):
    """The two circuit-breaker fields of ``FailoverConfig``."""

    failures_to_trip: int
    cooldown_s: float


@dataclass(frozen=True)
class FailureEvent:
    """One failed device call, as the ingress replica ``origin`` saw it (times on its clock)."""

    origin: str
    seq: int
    started: float
    """When the failed call was sent."""
    observed: float
    """When its failure was seen."""


def count_failures(events: Iterable[FailureEvent]) -> tuple[int, float | None]:
    """(consecutive failures, when the last counted one was seen), counting one per wave.

    Sorted by when they were seen, a failure counts only if its call was sent at or after
    the previous counted failure was seen: calls that were already in flight (on the same
    dead replica, or coalesced into the same device call) add no evidence.
    """
    count, last = 0, None
    for ev in sorted(events, key=lambda e: (e.observed, e.started)):
        if last is None or ev.started >= last:
            count += 1
            last = ev.observed
    return count, last


@dataclass
class TierView:
    """What the ingress knows about one tier: one load record per replica, and its health.

    ``events`` holds the failures since the last success, this replica's own and (after a
    sync, :mod:`dynray.serving.routing_state`) those other ingress replicas saw; the breaker
    state (``failures``, ``down_until``) is recounted from them.
    """

    tier: str
    origin: str = "local"
    loads: dict[str, LoadReport] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    """When each replica's load report arrived (this replica's clock)."""
    failures: int = 0
    down_until: float = 0.0
    last_success: float | None = None
    events: dict[tuple[str, int], FailureEvent] = field(default_factory=dict)
    _seq: int = 0

    def available(self, now: float) -> bool:
        return now >= self.down_until

    def success(self, reply: DeviceReply, now: float = 0.0) -> None:
        self.failures = 0
        self.down_until = 0.0
        self.events.clear()
        self.last_success = now if self.last_success is None else max(self.last_success, now)
        rep = LoadReport.from_dict(reply.load)
        self.loads[rep.replica] = rep
        self.seen[rep.replica] = now

    def failure(self, now: float, cfg: BreakerSettings, started: float | None = None) -> bool:
        """Record a failed call sent at ``started`` (default ``now``); True if it counted."""
        self._seq += 1
        ev = FailureEvent(self.origin, self._seq, now if started is None else started, now)
        before = self.failures
        self.events[(ev.origin, ev.seq)] = ev
        self._recount(cfg)
        return self.failures > before

    def absorb(self, foreign: Iterable[FailureEvent], last_success: float | None, cfg: BreakerSettings) -> None:
        """Take the failures and the latest success other ingress replicas saw (this clock)."""
        if last_success is not None and (self.last_success is None or last_success > self.last_success):
            self.last_success = last_success
        own = {k: e for k, e in self.events.items() if e.origin == self.origin}
        self.events = {**own, **{(e.origin, e.seq): e for e in foreign if e.origin != self.origin}}
        self._recount(cfg)

    def _recount(self, cfg: BreakerSettings) -> None:
        if self.last_success is not None:
            self.events = {k: e for k, e in self.events.items() if e.observed > self.last_success}
        if len(self.events) > MAX_EVENTS:
            keep = sorted(self.events.items(), key=lambda kv: kv[1].observed)[-MAX_EVENTS:]
            self.events = dict(keep)
        was_down = self.failures >= cfg.failures_to_trip
        self.failures, last = count_failures(self.events.values())
        self.down_until = last + cfg.cooldown_s if self.failures >= cfg.failures_to_trip and last is not None else 0.0
        if self.failures >= cfg.failures_to_trip and not was_down:
            self.loads.clear()  # stale: replicas are being replaced
            self.seen.clear()

    def best(self) -> LoadReport | None:
        healthy = [r for r in self.loads.values() if r.healthy]
        return min(healthy, key=lambda r: r.expected_wait_ms(), default=None)


@dataclass
class CallTime:
    """One tier's call time as seen from the ingress (network + queue + compute): the router's load input."""

    value: float
    """EWMA in ms; the first call replaces the start value."""
    calls: int = 0
    base: float | None = None
    """Lowest EWMA seen past the first calls (cold replicas, the start value): the tier's normal."""
    alpha: float = 0.3

    def update(self, ms: float) -> None:
        if self.calls == 0:
            self.value = ms
        self.value += self.alpha * (ms - self.value)
        self.calls += 1
        if self.calls >= 8:
            self.base = self.value if self.base is None else min(self.base, self.value)
