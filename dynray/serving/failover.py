"""The ingress's request plan: pick a path, call the tiers, retry, fail over, degrade.

Every routing and failover decision lives here, so retries and degradation have one home
(Serve does not retry a request a dying replica had already accepted; RAY_NOTES §1b).
Device calls are injected as async callables, so all of this runs in unit tests without
Ray; the Serve ingress passes callables that wrap ``DeploymentHandle`` calls and cancel
the request on the replica when a timeout abandons it.

Rules:
- A failed or timed-out call is retried (Serve's router then avoids a replica it saw die)
  while the per-request deadline allows.
- Only a *tier failure* counts against a tier (:func:`classify_error`): a replica that died,
  timed out or is unavailable. A device that refuses the call (version or stage not
  hosted: a config error) is not retried and not counted; a ``RequestError`` from a device
  goes back to the client as its 4xx.
- Edge tier down: the request goes straight to the cloud, which hosts the whole model.
- Cloud tier down: escalated samples are answered with the deepest edge exit's
  prediction and flagged ``degraded``.
- Neither tier answers: :class:`NoDeviceAvailable`, which the ingress turns into 503.
- A tier that fails ``failures_to_trip`` times in a row is skipped for ``cooldown_s``
  (circuit breaker, :mod:`dynray.serving.tiers`), so a dead cloud costs one timeout, not
  one per request. Failures count once per wave, not once per request: the requests
  coalesced into one device call, or in flight on one dead replica, are one failure.

Shape legend: N samples in the request, C classes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from dynray.errors import ConfigError, DynrayError, RequestError
from dynray.serving.partition import DeviceReply, DeviceRequest, StageInput
from dynray.routing.features import Load
from dynray.routing.rules import RouteContext, RouteTrace
from dynray.serving.scheduling import DeviceProfile, LoadReport, NoDeviceAvailable, PathEstimate, SchedulingPolicy, WorkloadEstimate, estimate_paths
from dynray.serving.tiers import CallTime, FailureEvent, TierView, count_failures

__all__ = [
    "FailoverConfig", "ErrorKind", "TIER_FAILURE_NAMES", "classify_error", "is_tier_failure",
    "FailureEvent", "count_failures", "TierView", "CallTime", "Answer", "Orchestrator", "DeviceCall",
]

log = logging.getLogger(__name__)

DeviceCall = Callable[[DeviceRequest], Awaitable[DeviceReply]]


@dataclass(frozen=True, kw_only=True)
class FailoverConfig:
    """Deadlines, retries and the circuit breaker."""

    deadline_s: float = 3.0
    """Whole-request budget across every call and retry."""
    edge_timeout_s: float = 1.0
    """One edge call."""
    cloud_timeout_s: float = 1.0
    """One cloud call; when it expires escalated samples are answered degraded."""
    attempts: int = 2
    """Calls per tier per request (first try plus retries)."""
    failures_to_trip: int = 2
    """Consecutive failures (one per wave, see ``dynray.serving.tiers.count_failures``) that mark a tier down."""
    cooldown_s: float = 1.0
    """How long a tripped tier is skipped before it is tried again."""

    def __post_init__(self) -> None:
        for name in ("deadline_s", "edge_timeout_s", "cloud_timeout_s", "cooldown_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0", got=getattr(self, name), fix="use a positive number of seconds")
        if self.attempts < 1 or self.failures_to_trip < 1:
            raise ConfigError("attempts and failures_to_trip must be >= 1", got=(self.attempts, self.failures_to_trip), fix="e.g. attempts=2")


class ErrorKind(enum.Enum):
    """What a failed device call says about the tier."""

    TIER = "tier"
    """The tier could not answer (replica died, timeout, cancelled, unavailable, crashed): retry, count, fail over."""
    REFUSED = "refused"
    """The device refused this call (a DynrayError from its own validation, e.g. version not hosted): the tier is fine."""
    CLIENT = "client"
    """The request itself is bad (a RequestError): the client gets its 4xx."""


# Ray's exceptions by class name, so this module needs no Ray: an actor that died or is
# unreachable, a timeout (asyncio's and Ray's GetTimeoutError are TimeoutErrors), a call
# cancelled by Serve, a deployment with no replica to take it, an overloaded replica, a lost node.
TIER_FAILURE_NAMES = frozenset({
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "TimeoutError", "GetTimeoutError",
    "TaskCancelledError", "RequestCancelledError", "DeploymentUnavailableError", "ReplicaUnavailableError",
    "BackPressureError", "NodeDiedError", "WorkerCrashedError", "LocalRayletDiedError", "ObjectLostError",
    "OwnerDiedError", "RaySystemError", "OutOfMemoryError", "ConnectionError",
})


def classify_error(exc: BaseException) -> ErrorKind:
    """Tier failure, refusal or client error (see :class:`ErrorKind`).

    A Ray failure class anywhere in the exception's MRO wins (an actor whose constructor
    raised a DynrayError is still a dead tier); then dynray's own errors, which reach the
    ingress as ``RayTaskError(<cause>)`` subclassing the cause (or with ``.cause`` set);
    anything else (a crash inside the device) is a tier failure.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = {c.__name__ for c in type(e).__mro__}
        if names & TIER_FAILURE_NAMES:
            return ErrorKind.TIER
        if isinstance(e, RequestError):
            return ErrorKind.CLIENT
        if isinstance(e, DynrayError):
            return ErrorKind.REFUSED
        cause = getattr(e, "cause", None) if "RayTaskError" in names else None
        e = cause if isinstance(cause, BaseException) else None
    return ErrorKind.TIER


def is_tier_failure(exc: BaseException) -> bool:
    """True when ``exc`` should count against the tier's circuit breaker."""
    return classify_error(exc) is ErrorKind.TIER


def _request_error(exc: BaseException) -> RequestError:
    """The RequestError inside a CLIENT-classified exception (the original, not Ray's wrapper)."""
    e: BaseException | None = exc
    while e is not None:
        cause = getattr(e, "cause", None)
        if isinstance(e, RequestError) and not isinstance(cause, RequestError):
            return e
        e = cause if isinstance(cause, BaseException) else None
    raise AssertionError("not a client error")  # classify_error said CLIENT


@dataclass
class Answer:
    """The assembled answer to one request."""

    logits: torch.Tensor  # [N, C]
    exit_index: torch.Tensor  # [N] int64
    tier: list[str]  # [N] tier that answered each sample
    degraded: torch.Tensor  # [N] bool: answered by an edge exit because the cloud was unreachable
    macs: dict[str, torch.Tensor]  # tier -> [N] int64 MACs spent there
    path: str  # "edge_first" | "cloud_direct"
    escalated: int = 0  # samples the edge handed on (or tried to)
    rerouted: torch.Tensor | None = None  # [N] bool: a failed MoE expert's tokens were answered by another expert
    device_failures: int = 0  # device calls that failed while answering (each retried or failed over)
    failed_calls: dict[str, int] = field(default_factory=dict)  # the same, per tier ({} normally)
    route_trace: RouteTrace | None = None  # [N] where the hybrid router overrode the rules (None: no device traced it)


@dataclass
class _Trace:
    """What happened to one request's device calls."""

    failures: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


class _Ewma:
    def __init__(self, value: float, alpha: float = 0.1) -> None:
        self.value, self.alpha = value, alpha

    def update(self, x: float) -> None:
        self.value += self.alpha * (x - self.value)


class Orchestrator:
    """Plans and executes one request over the edge and cloud tiers (see module docstring)."""

    def __init__(
        self,
        cfg: FailoverConfig,
        policy: SchedulingPolicy,
        *,
        edge: DeviceCall | None,
        cloud: DeviceCall | None,
        edge_stages: int,
        edge_macs: float,
        cloud_rest_macs: float,
        full_macs: float,
        profiles: dict[str, DeviceProfile],
        clock: Callable[[], float] = time.monotonic,
        origin: str = "local",
    ) -> None:
        if edge is None and cloud is None:
            raise ConfigError("at least one tier is needed", fix="pass an edge or a cloud device call")
        self.cfg, self.policy, self.clock = cfg, policy, clock
        self.calls = {"edge": edge, "cloud": cloud}
        self.views = {t: TierView(t, origin=origin) for t in ("edge", "cloud")}
        self.edge_stages = edge_stages
        self.profiles = profiles
        self._macs = (edge_macs, cloud_rest_macs, full_macs)
        self._escalate = _Ewma(0.1)
        self._edge_macs = _Ewma(float(edge_macs))
        self._ms_per_mmac = _Ewma(1.0)
        self.call_times = {t: CallTime(profiles[t].rtt_ms if t in profiles else 0.0) for t in ("edge", "cloud")}

    def adopt(self, previous: Orchestrator) -> None:
        """Keep what ``previous`` (the plan before a reconfigure) learnt about the tiers."""
        for t in ("edge", "cloud"):
            self.views[t] = previous.views[t]
            self.call_times[t] = previous.call_times[t]

    def load_snapshot(self, nominal_ms: dict[str, float] | None = None) -> Load:
        """Live load as the router observes it: the best replica's queue and each tier's call time.

        With ``nominal_ms`` (the call times the router was trained with), a tier's call time is
        reported as ``nominal * EWMA / normal``, where normal is the lowest EWMA seen: the
        router sees how much slower than usual each tier is, without the constant per-hop
        overhead of the serving stack it never saw in training.
        """
        q = {}
        for tier, view in self.views.items():
            best = view.best()
            q[tier] = float(best.queue_len) if best is not None else 0.0
        ms = {}
        for t in ("edge", "cloud"):
            ewma, base = self.call_times[t].value, self.call_times[t].base
            if nominal_ms is None:
                ms[t] = ewma
            else:
                ms[t] = nominal_ms[t] * (ewma / base) if base else nominal_ms[t]
        return Load(edge_queue=q["edge"], edge_ms=ms["edge"], cloud_queue=q["cloud"], cloud_ms=ms["cloud"])

    def workload(self) -> WorkloadEstimate:
        _, rest, full = self._macs
        return WorkloadEstimate(edge_macs=self._edge_macs.value, cloud_rest_macs=rest, full_macs=full, escalate_frac=min(max(self._escalate.value, 0.0), 1.0), ms_per_mmac=max(self._ms_per_mmac.value, 1e-6))

    def estimates(self) -> list[PathEstimate]:
        now = self.clock()
        reps: dict[str, LoadReport | None] = {}
        for tier, view in self.views.items():
            if self.calls[tier] is None or not view.available(now):
                reps[tier] = None
            elif view.loads:  # None when every replica reported itself unhealthy
                reps[tier] = view.best()
            else:  # no report yet: an idle replica of the configured profile
                reps[tier] = LoadReport(replica="?", profile=self.profiles[tier], in_flight=0, queue_len=0, ewma_service_ms=0.0)
        return estimate_paths(self.workload(), reps["edge"], reps["cloud"])

    def choose_path(self) -> str:
        if self.calls["edge"] is None:
            return "cloud_direct"
        if self.calls["cloud"] is None:
            return "edge_first"
        ests = self.estimates()
        # no tier looks usable: answer() still walks edge then cloud, each call re-checking its breaker
        return self.policy.choose_path(ests).path if ests else "edge_first"

    async def _call(self, tier: str, req: DeviceRequest, timeout_s: float, until: float, trace: _Trace) -> DeviceReply | None:
        call, view = self.calls[tier], self.views[tier]
        if call is None:
            return None
        for attempt in range(self.cfg.attempts):
            t_call = self.clock()
            left = until - t_call
            if left <= 0 or not view.available(t_call):
                return None
            try:
                reply = await asyncio.wait_for(call(req), timeout=min(timeout_s, left))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - classified: every kind has its handling below
                kind = classify_error(e)
                if kind is ErrorKind.CLIENT:
                    raise _request_error(e) from None
                if kind is ErrorKind.REFUSED:  # deterministic: the same device would refuse a retry
                    msg = e.message if isinstance(e, DynrayError) else str(e)
                    trace.refused.append(f"{tier}: {msg}")
                    log.warning("%s refused the call (not a tier failure): %s", tier, msg[:300])
                    return None
                trace.failures += 1
                trace.by_tier[tier] = trace.by_tier.get(tier, 0) + 1
                counted = view.failure(self.clock(), self.cfg, started=t_call)
                log.warning("%s call failed (attempt %d/%d, %s): %s", tier, attempt + 1, self.cfg.attempts,
                            "counted" if counted else "same wave", type(e).__name__)
                continue
            now = self.clock()
            view.success(reply, now)
            self._ms_per_mmac.update(reply.ms_per_mmac)
            self.call_times[tier].update((now - t_call) * 1000)
            return reply
        return None

    def _unavailable(self, trace: _Trace) -> NoDeviceAvailable:
        if trace.refused:
            return NoDeviceAvailable("no tier could answer: " + "; ".join(trace.refused)[:400], fix="serve only versions every tier hosts (roll devices before the ingress), then retry after the Retry-After delay")
        return NoDeviceAvailable("no tier could answer within the deadline", got=f"{self.cfg.deadline_s}s", fix="retry after the Retry-After delay")

    async def answer(self, images: torch.Tensor, version: str, route: RouteContext | None = None) -> Answer:
        """Answer ``images`` [N, C, H, W] with model ``version``; raises NoDeviceAvailable.

        ``route`` names the router the devices apply (None: the model's thresholds). A
        ``RequestError`` a device raises is re-raised (the client's 4xx).
        """
        until = self.clock() + self.cfg.deadline_s
        n = images.shape[0]
        trace = _Trace()
        path = self.choose_path()
        first = DeviceRequest(version, 0, StageInput(h=images), route)
        if path == "cloud_direct":
            reply = await self._call("cloud", first, self.cfg.cloud_timeout_s, until, trace)
            if reply is not None:
                return _assemble(n, "cloud_direct", [reply], trace=trace)
        edge = await self._call("edge", first, self.cfg.edge_timeout_s, until, trace)
        if edge is None:
            if path == "cloud_direct":  # both tiers failed
                raise self._unavailable(trace)
            reply = await self._call("cloud", first, self.cfg.cloud_timeout_s, until, trace)
            if reply is None:
                raise self._unavailable(trace)
            return _assemble(n, "cloud_direct", [reply], trace=trace)
        r = edge.result
        n_cont = int(r.cont.numel())
        self._escalate.update(n_cont / max(n, 1))
        self._edge_macs.update(float(r.macs.double().mean()))
        if not n_cont:
            return _assemble(n, "edge_first", [edge], trace=trace)
        cloud = await self._call("cloud", DeviceRequest(version, self.edge_stages, r.cont_input, route), self.cfg.cloud_timeout_s, until, trace)
        return _assemble(n, "edge_first", [edge] if cloud is None else [edge, cloud], escalated=n_cont, trace=trace)


def _assemble(n: int, path: str, replies: list[DeviceReply], escalated: int = 0, trace: _Trace | None = None) -> Answer:
    """Merge device replies into per-sample results; continuations left over are degraded."""
    first = replies[0].result
    c = first.logits.shape[1] if first.logits.numel() else first.cont_logits.shape[1]
    logits = torch.empty(n, c)
    exit_index = torch.full((n,), -1, dtype=torch.int64)
    tier = [""] * n
    degraded = torch.zeros(n, dtype=torch.bool)
    macs: dict[str, torch.Tensor] = {}
    pos = torch.arange(n)  # positions (in the request) of the batch the current reply saw
    rerouted = torch.zeros(n, dtype=torch.bool)
    route_trace = RouteTrace.empty(n) if any(r.result.route_trace is not None for r in replies) else None
    for rep in replies:
        res = rep.result
        if res.rerouted is not None:
            rerouted[pos[res.rerouted]] = True
        if res.route_trace is not None and route_trace is not None:
            route_trace.absorb(pos, res.route_trace)
        where = pos.index_select(0, res.done)
        logits.index_copy_(0, where, res.logits)
        exit_index.index_copy_(0, where, res.exit_index)
        for i in where.tolist():
            tier[i] = rep.tier
        macs.setdefault(rep.tier, torch.zeros(n, dtype=torch.int64)).index_add_(0, pos, res.macs)
        left = pos.index_select(0, res.cont)
        pos, last = left, rep
    if pos.numel():  # no deeper tier answered: degrade to the deepest exit evaluated
        res = last.result
        logits.index_copy_(0, pos, res.cont_logits)
        exit_index.index_fill_(0, pos, res.cont_exit)
        degraded.index_fill_(0, pos, True)
        for i in pos.tolist():
            tier[i] = last.tier
    return Answer(logits=logits, exit_index=exit_index, tier=tier, degraded=degraded, macs=macs, path=path, escalated=escalated, rerouted=rerouted,
                  device_failures=trace.failures if trace is not None else 0, failed_calls=dict(trace.by_tier) if trace is not None else {},
                  route_trace=route_trace)
