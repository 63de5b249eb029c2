"""Routing state shared by the ingress replicas: tier health, load reports, call times.

Each ingress replica keeps its own :class:`~dynray.serving.failover.Orchestrator`, so the
request path reads only local memory. Off the request path, every ``period`` a replica
pushes an :class:`Observation` of what it saw to one :class:`RoutingStateStore` per app
(wired as a Serve deployment in ``actors/routing_state.py``) and applies the merged
:class:`SharedView` it gets back (:class:`ReplicaSync`). So when one replica sees a tier go
down, the others skip it within a period too, and a success anywhere closes the breaker
everywhere.

What is merged, per tier:
- the circuit breaker: the latest success anywhere, and every replica's failures since it,
  counted once per wave across replicas (:func:`dynray.serving.tiers.count_failures`), so
  the calls several replicas had in flight on one dead device replica count once;
- device load reports: the freshest report per device replica;
- the call-time EWMA: weighted by the calls each replica made since its last push; the
  tier's normal (lowest EWMA) is the lowest any replica saw.

Times travel as ages (seconds before the push or the reply), so the replicas' clocks never
need to agree. A replica that stops pushing (killed) is forgotten after ``expire_s``.
Pure Python, no Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dynray.errors import ConfigError
from dynray.serving.failover import Orchestrator
from dynray.serving.scheduling import LoadReport
from dynray.serving.tiers import MAX_EVENTS, FailureEvent

__all__ = ["SharedFailure", "TierObservation", "Observation", "SharedView", "RoutingStateStore", "ReplicaSync"]


@dataclass(frozen=True)
class SharedFailure:
    """A :class:`FailureEvent` on the wire: ages in seconds instead of clock times."""

    origin: str
    seq: int
    started_age_s: float
    observed_age_s: float


@dataclass(frozen=True, kw_only=True)
class TierObservation:
    """One tier as one ingress replica saw it (or, in a :class:`SharedView`, as all did)."""

    success_age_s: float | None = None
    """Seconds since the latest successful call (None: none yet)."""
    failures: tuple[SharedFailure, ...] = ()
    """Failed calls since that success."""
    loads: tuple[tuple[LoadReport, float], ...] = ()
    """(device replica's load report, its age in s)."""
    call_ms: float | None = None
    """Call-time EWMA in ms (None before the first call)."""
    base_ms: float | None = None
    """The tier's normal call time (lowest EWMA seen)."""
    weight: int = 0
    """Calls since the previous push: how much ``call_ms`` counts in the merge."""


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What one ingress replica pushes."""

    replica: str
    tiers: dict[str, TierObservation]


@dataclass(frozen=True, kw_only=True)
class SharedView:
    """The merged state the store answers with (ages relative to the answer)."""

    tiers: dict[str, TierObservation]
    replicas: tuple[str, ...]
    """Ingress replicas heard from within ``expire_s``."""
    rl_weight: dict[str, float] = field(default_factory=dict)
    """The hybrid router's trust per served version, learnt from label feedback (``actors/routing_state.py`` adds it)."""


@dataclass
class _Seen:
    at: float  # store clock when received
    obs: Observation


@dataclass
class RoutingStateStore:
    """The per-app store: keeps each ingress replica's latest observation, answers the merge."""

    expire_s: float = 3.0
    """Forget a replica not heard from for this long (a killed ingress replica)."""
    load_stale_s: float = 30.0
    """Drop device load reports older than this."""
    clock: Callable[[], float] = time.monotonic
    _latest: dict[str, _Seen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.expire_s <= 0 or self.load_stale_s <= 0:
            raise ConfigError("expire_s and load_stale_s must be > 0", got=(self.expire_s, self.load_stale_s), fix="e.g. expire_s=3.0 (six 0.5 s sync periods)")

    def push(self, obs: Observation) -> SharedView:
        """Record ``obs`` and return the merge of every live replica's latest observation."""
        now = self.clock()
        self._latest[obs.replica] = _Seen(now, obs)
        return self.view()

    def replicas(self) -> list[str]:
        now = self.clock()
        return sorted(r for r, s in self._latest.items() if now - s.at <= self.expire_s)

    def view(self) -> SharedView:
        now = self.clock()
        self._latest = {r: s for r, s in self._latest.items() if now - s.at <= self.expire_s}
        tiers = sorted({t for s in self._latest.values() for t in s.obs.tiers})
        return SharedView(tiers={t: self._merge(t, now) for t in tiers}, replicas=tuple(sorted(self._latest)))

    def _merge(self, tier: str, now: float) -> TierObservation:
        seen = [(s.at, s.obs.tiers[tier]) for s in self._latest.values() if tier in s.obs.tiers]
        # back to the store's clock: an age a pushed at t happened at t - a
        successes = [at - o.success_age_s for at, o in seen if o.success_age_s is not None]
        last_success = max(successes, default=None)
        events: dict[tuple[str, int], tuple[float, float]] = {}
        for at, o in seen:
            for f in o.failures:
                observed = at - f.observed_age_s
                if last_success is None or observed > last_success:
                    events[(f.origin, f.seq)] = (at - f.started_age_s, observed)
        newest = sorted(events.items(), key=lambda kv: kv[1][1])[-MAX_EVENTS:]
        loads: dict[str, tuple[LoadReport, float]] = {}
        for at, o in seen:
            for rep, age in o.loads:
                t = at - age
                if now - t <= self.load_stale_s and (rep.replica not in loads or loads[rep.replica][1] < t):
                    loads[rep.replica] = (rep, t)
        timed = [(o.call_ms, o.weight) for _, o in seen if o.call_ms is not None]
        total = sum(w for _, w in timed)
        call_ms = sum(ms * w for ms, w in timed) / total if total > 0 else None
        bases = [o.base_ms for _, o in seen if o.base_ms is not None]
        return TierObservation(
            success_age_s=None if last_success is None else now - last_success,
            failures=tuple(SharedFailure(k[0], k[1], now - s, now - ob) for k, (s, ob) in newest),
            loads=tuple((rep, now - t) for rep, t in loads.values()),
            call_ms=call_ms,
            base_ms=min(bases, default=None),
            weight=total,
        )


class ReplicaSync:
    """One ingress replica's side of the sync: what to push, and how to take the answer."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self._calls: dict[str, int] = {}  # tier -> calls counted at the previous push

    def observation(self, orch: Orchestrator, now: float) -> Observation:
        """This replica's own view (``now`` on ``orch``'s clock)."""
        tiers = {}
        for t, view in orch.views.items():
            ct = orch.call_times[t]
            tiers[t] = TierObservation(
                success_age_s=None if view.last_success is None else now - view.last_success,
                failures=tuple(SharedFailure(e.origin, e.seq, now - e.started, now - e.observed) for e in view.events.values() if e.origin == view.origin),
                loads=tuple((rep, now - view.seen.get(r, now)) for r, rep in view.loads.items()),
                call_ms=ct.value if ct.calls else None,
                base_ms=ct.base,
                weight=max(ct.calls - self._calls.get(t, 0), 0),
            )
            self._calls[t] = ct.calls
        return Observation(replica=self.replica, tiers=tiers)

    def apply(self, orch: Orchestrator, shared: SharedView, now: float) -> None:
        """Merge ``shared`` (what every replica saw) into ``orch``'s views and call times."""
        for t, s in shared.tiers.items():
            if t not in orch.views:
                continue
            view, ct = orch.views[t], orch.call_times[t]
            foreign = [FailureEvent(f.origin, f.seq, now - f.started_age_s, now - f.observed_age_s) for f in s.failures]
            view.absorb(foreign, None if s.success_age_s is None else now - s.success_age_s, orch.cfg)
            if view.available(now):
                for rep, age in s.loads:
                    at = now - age
                    if view.seen.get(rep.replica, float("-inf")) < at:
                        view.loads[rep.replica], view.seen[rep.replica] = rep, at
            if s.call_ms is not None and s.weight > 0:
                ct.value = s.call_ms
                if ct.calls == 0:  # a shared value is not a cold start: the next call must not replace it
                    ct.calls = self._calls[t] = 1
            if s.base_ms is not None:
                ct.base = s.base_ms if ct.base is None else min(ct.base, s.base_ms)
