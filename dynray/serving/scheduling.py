"""Edge/cloud scheduling: device profiles, live replica load, a latency/cost model of the
two serving paths, and the policies that choose a path and rank replicas.

A request either goes ``edge_first`` (the cheap edge tier runs the early stages and exits
easy samples; hard ones escalate to the cloud) or ``cloud_direct`` (the whole model on the
cloud). ``estimate_paths`` prices both from the served model's MACs and each tier's best
replica's ``LoadReport``; a registered ``SchedulingPolicy`` picks one and ranks replicas
for the Ray Serve request router. Pure Python: no Ray, unit-testable on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, Protocol, TypeVar

from dynray.errors import ConfigError, DynrayError, UnknownNameError

__all__ = [
    "TIERS", "DeviceProfile", "EDGE_PROFILE", "CLOUD_PROFILE", "LoadReport", "LoadTracker",
    "WorkloadEstimate", "PathEstimate", "estimate_paths", "request_cost", "NoDeviceAvailable",
    "SchedulingPolicy", "POLICIES", "register_policy", "get_policy", "policy_names",
    "LatencyPolicy", "CostPolicy", "BalancedPolicy",
]

TIERS = ("edge", "cloud")
_TIE = 1e-9  # scores closer than this share a replica rank
_T = TypeVar("_T")


class NoDeviceAvailable(DynrayError):
    """No healthy edge or cloud replica can take the request."""


def _number(what: str, v: object, *, lo: float = 0.0, strict: bool = False, hi: float | None = None) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if strict else v >= lo) and (hi is None or v <= hi)  # type: ignore[operator]
    if not ok:
        rng = f"{'>' if strict else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        raise ConfigError(f"{what} must be a finite number {rng}", got=v, fix=f"set {what} {rng}")


def _from_dict(cls: type[_T], d: Mapping[str, Any], **convert: Callable[[Any], Any]) -> _T:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{cls.__name__} must be given as a dict", got=type(d).__name__)
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(allowed))
    missing = [k for k in required if k not in d]
    if unknown or missing:
        bad = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
        raise ConfigError(f"bad {cls.__name__} dict: {bad}", got=sorted(d), fix=f"allowed keys: {', '.join(allowed)}")
    return cls(**{k: convert[k](v) if k in convert else v for k, v in d.items()})


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """What one device tier is like: speed, network distance, price and memory."""

    tier: str
    """Tier the device serves: "edge" or "cloud"."""
    speed: float
    """Compute-speed factor against this machine's CPU (> 0); 0.25 = compute takes 4x as long."""
    rtt_ms: float
    """Simulated network round trip to the device in ms (>= 0; 0 on a real cluster)."""
    cost_per_mmac: float
    """Cost units per million MACs computed on the device (>= 0)."""
    memory_mb: int
    """Device memory in MB (> 0)."""

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ConfigError("unknown device tier", got=self.tier, fix=f"use one of {', '.join(TIERS)}")
        _number("speed", self.speed, strict=True)
        _number("rtt_ms", self.rtt_ms)
        _number("cost_per_mmac", self.cost_per_mmac)
        if not isinstance(self.memory_mb, int) or isinstance(self.memory_mb, bool) or self.memory_mb <= 0:
            raise ConfigError("memory_mb must be an integer > 0", got=self.memory_mb, fix="set memory_mb in MB, e.g. 2048")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceProfile:
        """Inverse of ``to_dict``; unknown or missing keys raise ``ConfigError``."""
        return _from_dict(cls, d)

    def slowdown_s(self, compute_s: float) -> float:
        """Delay to inject after ``compute_s`` of real compute so it takes ``compute_s / speed``.

        ``compute_s * (1/speed - 1)``; 0 for a device faster than this CPU (speed >= 1),
        since a delay cannot be negative.
        """
        return max(0.0, compute_s * (1.0 / self.speed - 1.0))


EDGE_PROFILE = DeviceProfile(tier="edge", speed=0.25, rtt_ms=5.0, cost_per_mmac=1.0, memory_mb=2048)
CLOUD_PROFILE = DeviceProfile(tier="cloud", speed=1.0, rtt_ms=40.0, cost_per_mmac=4.0, memory_mb=32768)


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """One replica's live load, as the replica reports it."""

    replica: str
    """Replica id (the Ray Serve replica id on a cluster)."""
    profile: DeviceProfile
    """The device the replica runs on."""
    in_flight: int
    """Requests accepted and not yet answered (>= 0)."""
    queue_len: int
    """Requests waiting for the compute slot or batch (>= 0)."""
    ewma_service_ms: float
    """EWMA of per-request service time in ms (compute incl. injected slowdown; >= 0)."""
    healthy: bool = True
    """False: the replica must not be scheduled."""

    def __post_init__(self) -> None:
        if not isinstance(self.profile, DeviceProfile):
            raise ConfigError("LoadReport.profile must be a DeviceProfile", got=type(self.profile).__name__)
        for name in ("in_flight", "queue_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0", got=v)
        _number("ewma_service_ms", self.ewma_service_ms)

    def expected_wait_ms(self) -> float:
        """Time a new request waits before its compute starts: queue_len * ewma_service_ms."""
        return self.queue_len * self.ewma_service_ms if self.queue_len else 0.0

    def expected_finish_ms(self) -> float:
        """Expected wait + one service time + the device's round trip."""
        return self.expected_wait_ms() + self.ewma_service_ms + self.profile.rtt_ms

    def to_dict(self) -> dict:
        return asdict(self)  # nests the profile as a plain dict

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoadReport:
        """Inverse of ``to_dict``; unknown or missing keys raise ``ConfigError``."""
        return _from_dict(cls, d, profile=lambda p: p if isinstance(p, DeviceProfile) else DeviceProfile.from_dict(p))


class LoadTracker:
    """Live load bookkeeping inside one device replica (single asyncio thread, no locks)."""

    def __init__(self, alpha: float = 0.2) -> None:
        _number("alpha", alpha, strict=True, hi=1.0)
        self.alpha = float(alpha)
        self.in_flight = 0
        self.queue_len = 0
        self.ewma_service_ms = 0.0
        self.samples = 0

    def enqueue(self) -> None:
        self.queue_len += 1

    def dequeue(self) -> None:
        self.queue_len = max(0, self.queue_len - 1)

    def start(self) -> None:
        self.in_flight += 1

    def finish(self, service_ms: float) -> None:
        """One request answered after ``service_ms``; the first sample initialises the EWMA."""
        _number("service_ms", service_ms)
        self.in_flight = max(0, self.in_flight - 1)
        if self.samples == 0:
            self.ewma_service_ms = float(service_ms)
        else:
            self.ewma_service_ms = self.alpha * service_ms + (1.0 - self.alpha) * self.ewma_service_ms
        self.samples += 1

    def report(self, replica: str, profile: DeviceProfile, healthy: bool = True) -> LoadReport:
        return LoadReport(replica=replica, profile=profile, in_flight=self.in_flight, queue_len=self.queue_len,
                          ewma_service_ms=self.ewma_service_ms, healthy=healthy)


@dataclass(frozen=True, kw_only=True)
class WorkloadEstimate:
    """What the ingress knows about the served model and recent traffic (MACs per sample)."""

    edge_macs: float
    """Mean MACs a request spends on the edge tier (stages it hosts, incl. exit heads)."""
    cloud_rest_macs: float
    """MACs to finish an escalated sample on the cloud (remaining stages and heads)."""
    full_macs: float
    """MACs of the whole model on the cloud tier when sent there directly."""
    escalate_frac: float
    """Recent share of edge samples escalated to the cloud, in [0, 1]."""
    ms_per_mmac: float
    """Measured compute time on this CPU per million MACs at speed 1.0 (> 0)."""

    def __post_init__(self) -> None:
        for name in ("edge_macs", "cloud_rest_macs", "full_macs"):
            _number(name, getattr(self, name))
        _number("escalate_frac", self.escalate_frac, hi=1.0)
        _number("ms_per_mmac", self.ms_per_mmac, strict=True)


@dataclass(frozen=True)
class PathEstimate:
    """Expected latency and cost of one serving path, per sample."""

    path: str
    """Path name: "edge_first" or "cloud_direct"."""
    latency_ms: float
    """Expected end-to-end latency in ms."""
    cost: float
    """Expected cost units per sample."""


def estimate_paths(work: WorkloadEstimate, edge: LoadReport | None, cloud: LoadReport | None) -> list[PathEstimate]:
    """Latency and cost of ``edge_first`` and ``cloud_direct`` given each tier's chosen replica.

    Unhealthy reports count as absent. Without a cloud replica ``edge_first`` keeps only its
    edge terms (escalations are answered degraded) and ``cloud_direct`` is left out; without
    either the list is empty.
    """
    edge = edge if edge is not None and edge.healthy else None
    cloud = cloud if cloud is not None and cloud.healthy else None

    def leg(r: LoadReport, macs: float) -> tuple[float, float]:  # (latency ms, cost) on one device
        mm = macs / 1e6
        return r.profile.rtt_ms + r.expected_wait_ms() + mm * work.ms_per_mmac / r.profile.speed, mm * r.profile.cost_per_mmac

    out: list[PathEstimate] = []
    if edge is not None:
        lat, cost = leg(edge, work.edge_macs)
        if cloud is not None:
            c_lat, c_cost = leg(cloud, work.cloud_rest_macs)
            lat, cost = lat + work.escalate_frac * c_lat, cost + work.escalate_frac * c_cost
        out.append(PathEstimate("edge_first", lat, cost))
    if cloud is not None:
        out.append(PathEstimate("cloud_direct", *leg(cloud, work.full_macs)))
    return out


def request_cost(macs_by_tier: Mapping[str, float], profiles: Mapping[str, DeviceProfile]) -> float:
    """Cost of one request: sum over the tiers it touched of MACs / 1e6 * cost_per_mmac."""
    total = 0.0
    for tier, macs in macs_by_tier.items():
        _number(f"MACs on tier {tier!r}", macs)
        if macs == 0:
            continue
        if tier not in profiles:
            raise UnknownNameError("tier", tier, profiles)
        total += macs / 1e6 * profiles[tier].cost_per_mmac
    return total


class SchedulingPolicy(Protocol):
    """Chooses a serving path and ranks replicas (rank 0 is tried first by the router)."""

    name: str

    def choose_path(self, estimates: Sequence[PathEstimate]) -> PathEstimate: ...

    def rank_replicas(self, loads: Sequence[LoadReport]) -> list[list[str]]: ...


# The only module-level state: filled once at import by the decorators below.
POLICIES: dict[str, type] = {}


def register_policy(name: str) -> Callable[[type[_T]], type[_T]]:
    """Register a policy class under ``name``; a name registered twice raises ``ConfigError``."""

    def decorator(cls: type[_T]) -> type[_T]:
        if name in POLICIES:
            raise ConfigError("scheduling policy name is already registered", got=name,
                              fix="register the new policy under another name")
        POLICIES[name] = cls
        return cls

    return decorator


def get_policy(name: str, **params: Any) -> SchedulingPolicy:
    """A new instance of policy ``name`` (``params`` go to its constructor, e.g. ``weight``)."""
    if name not in POLICIES:
        raise UnknownNameError("scheduling policy", name, POLICIES)
    try:
        return POLICIES[name](**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for scheduling policy {name!r}", got=params, fix=str(e)) from None


def policy_names() -> list[str]:
    """Names of all registered policies, sorted."""
    return sorted(POLICIES)


def _pick(estimates: Sequence[PathEstimate], key: Callable[[PathEstimate], tuple[float, ...]]) -> PathEstimate:
    if not estimates:
        raise NoDeviceAvailable("no healthy edge or cloud replica to serve the request",
                                fix="wait for replicas to recover or scale up a device tier")
    return min(estimates, key=key)


def _rank(loads: Sequence[LoadReport], key: Callable[[LoadReport], tuple[float, ...]]) -> list[list[str]]:
    """Healthy replicas sorted by ``key``; keys equal within ``_TIE`` share a rank."""
    scored = sorted(((key(r), r.replica) for r in loads if r.healthy), key=lambda t: t[0])
    ranks: list[list[str]] = []
    first: tuple[float, ...] | None = None
    for k, replica in scored:
        if first is not None and all(abs(a - b) <= _TIE for a, b in zip(k, first)):
            ranks[-1].append(replica)
        else:
            ranks.append([replica])
            first = k
    return ranks


def _norm(values: Sequence[float]) -> list[float]:
    """Values divided by their minimum; by the maximum when the minimum is 0; all 0 if all 0."""
    lo, hi = min(values), max(values)
    d = lo if lo > 0 else (hi if hi > 0 else 1.0)
    return [v / d for v in values]


@register_policy("latency")
@dataclass(frozen=True, kw_only=True)
class LatencyPolicy:
    """Fastest path; replicas by expected finish time (wait + service + round trip)."""

    name: ClassVar[str] = "latency"

    def choose_path(self, estimates: Sequence[PathEstimate]) -> PathEstimate:
        return _pick(estimates, lambda e: (e.latency_ms, e.cost))

    def rank_replicas(self, loads: Sequence[LoadReport]) -> list[list[str]]:
        return _rank(loads, lambda r: (r.expected_finish_ms(),))


@register_policy("cost")
@dataclass(frozen=True, kw_only=True)
class CostPolicy:
    """Cheapest path (ties: faster); replicas by cost_per_mmac, then expected wait."""

    name: ClassVar[str] = "cost"

    def choose_path(self, estimates: Sequence[PathEstimate]) -> PathEstimate:
        return _pick(estimates, lambda e: (e.cost, e.latency_ms))

    def rank_replicas(self, loads: Sequence[LoadReport]) -> list[list[str]]:
        return _rank(loads, lambda r: (r.profile.cost_per_mmac, r.expected_wait_ms()))


@register_policy("balanced")
@dataclass(frozen=True, kw_only=True)
class BalancedPolicy:
    """Minimises weight * latency / min latency + (1 - weight) * cost / min cost."""

    weight: float = 0.5
    """Share of latency in the score, in [0, 1]: 1 = the latency policy, 0 = cost only."""
    name: ClassVar[str] = "balanced"

    def __post_init__(self) -> None:
        _number("weight", self.weight, hi=1.0)

    def _mix(self, latency: Sequence[float], cost: Sequence[float]) -> list[float]:
        return [self.weight * a + (1 - self.weight) * b for a, b in zip(_norm(latency), _norm(cost))]

    def choose_path(self, estimates: Sequence[PathEstimate]) -> PathEstimate:
        scores = self._mix([e.latency_ms for e in estimates], [e.cost for e in estimates]) if estimates else []
        by_id = {id(e): s for e, s in zip(estimates, scores)}
        return _pick(estimates, lambda e: (by_id[id(e)], e.latency_ms, e.cost))

    def rank_replicas(self, loads: Sequence[LoadReport]) -> list[list[str]]:
        healthy = [r for r in loads if r.healthy]
        if not healthy:
            return []
        score = dict(zip((r.replica for r in healthy),
                         self._mix([r.expected_finish_ms() for r in healthy], [r.profile.cost_per_mmac for r in healthy])))
        return _rank(healthy, lambda r: (score[r.replica],))
