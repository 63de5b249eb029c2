"""The ingress's request plan: pick a path, call the tiers, retry, fail over, degrade.

Every routing and failover decision lives here, so retries and degradation have one home
(Serve does not retry a request a dying replica had already accepted; RAY_NOTES §1b).
Device calls are injected as async callables, so all of this runs in unit tests without
Ray; the Serve ingress passes callables that wrap ``DeploymentHandle`` calls and cancel
the request on the replica when a timeout abandons it.

Rules:
- A failed or timed-out call is retried (Serve's router then avoids a replica it saw die)
  while the per-request deadline allows.
- Edge tier down: the request goes straight to the cloud, which hosts the whole model.
- Cloud tier down: escalated samples are answered with the deepest edge exit's
  prediction and flagged ``degraded``.
- Neither tier answers: :class:`NoDeviceAvailable`, which the ingress turns into 503.
- A tier that fails ``failures_to_trip`` times in a row is skipped for ``cooldown_s``
  (circuit breaker), so a dead cloud costs one timeout, not one per request.

Shape legend: N samples in the request, C classes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from dynray.errors import ConfigError
from dynray.serving.partition import DeviceReply, DeviceRequest, StageInput
from dynray.routing.features import Load
from dynray.routing.rules import RouteContext
from dynray.serving.scheduling import DeviceProfile, LoadReport, NoDeviceAvailable, PathEstimate, SchedulingPolicy, WorkloadEstimate, estimate_paths

__all__ = ["FailoverConfig", "TierView", "Answer", "Orchestrator", "DeviceCall"]

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
    """Consecutive failures that mark a tier down."""
    cooldown_s: float = 1.0
    """How long a tripped tier is skipped before it is tried again."""

    def __post_init__(self) -> None:
        for name in ("deadline_s", "edge_timeout_s", "cloud_timeout_s", "cooldown_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0", got=getattr(self, name), fix="use a positive number of seconds")
        if self.attempts < 1 or self.failures_to_trip < 1:
            raise ConfigError("attempts and failures_to_trip must be >= 1", got=(self.attempts, self.failures_to_trip), fix="e.g. attempts=2")


@dataclass
class TierView:
    """What the ingress knows about one tier: one load record per replica, and its health."""

    tier: str
    loads: dict[str, LoadReport] = field(default_factory=dict)
    failures: int = 0
    down_until: float = 0.0

    def available(self, now: float) -> bool:
        return now >= self.down_until

    def success(self, reply: DeviceReply) -> None:
        self.failures = 0
        self.down_until = 0.0
        rep = LoadReport.from_dict(reply.load)
        self.loads[rep.replica] = rep

    def failure(self, now: float, cfg: FailoverConfig) -> None:
        self.failures += 1
        if self.failures >= cfg.failures_to_trip:
            self.down_until = now + cfg.cooldown_s
            self.loads.clear()  # stale: replicas are being replaced

    def best(self) -> LoadReport | None:
        healthy = [r for r in self.loads.values() if r.healthy]
        return min(healthy, key=lambda r: r.expected_wait_ms(), default=None)


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
    ) -> None:
        if edge is None and cloud is None:
            raise ConfigError("at least one tier is needed", fix="pass an edge or a cloud device call")
        self.cfg, self.policy, self.clock = cfg, policy, clock
        self.calls = {"edge": edge, "cloud": cloud}
        self.views = {"edge": TierView("edge"), "cloud": TierView("cloud")}
        self.edge_stages = edge_stages
        self.profiles = profiles
        self._macs = (edge_macs, cloud_rest_macs, full_macs)
        self._escalate = _Ewma(0.1)
        self._edge_macs = _Ewma(float(edge_macs))
        self._ms_per_mmac = _Ewma(1.0)
        # call time per tier as seen from here (network + queue + compute): the router's load input
        self._call_ms = {t: _Ewma(profiles[t].rtt_ms if t in profiles else 0.0, alpha=0.3) for t in ("edge", "cloud")}  # restarts at the first call
        self._calls = {"edge": 0, "cloud": 0}
        self._base_ms: dict[str, float | None] = {"edge": None, "cloud": None}  # lowest call-time EWMA seen: the tier's normal

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
            ewma, base = self._call_ms[t].value, self._base_ms[t]
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

    async def _call(self, tier: str, req: DeviceRequest, timeout_s: float, until: float) -> DeviceReply | None:
        call, view = self.calls[tier], self.views[tier]
        if call is None:
            return None
        for attempt in range(self.cfg.attempts):
            now = self.clock()
            left = until - now
            if left <= 0 or not view.available(now):
                return None
            t_call = self.clock()
            try:
                reply = await asyncio.wait_for(call(req), timeout=min(timeout_s, left))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any device failure is handled the same way: retry, then fail over
                log.warning("%s call failed (attempt %d/%d): %s", tier, attempt + 1, self.cfg.attempts, type(e).__name__)
                view.failure(self.clock(), self.cfg)
                continue
            view.success(reply)
            self._ms_per_mmac.update(reply.ms_per_mmac)
            ms = (self.clock() - t_call) * 1000
            if self._calls[tier] == 0:
                self._call_ms[tier].value = ms
            self._call_ms[tier].update(ms)
            self._calls[tier] += 1
            if self._calls[tier] >= 8:  # past the first calls (cold replicas, the EWMA's start value)
                cur, base = self._call_ms[tier].value, self._base_ms[tier]
                self._base_ms[tier] = cur if base is None else min(base, cur)
            return reply
        return None

    async def answer(self, images: torch.Tensor, version: str, route: RouteContext | None = None) -> Answer:
        """Answer ``images`` [N, C, H, W] with model ``version``; raises NoDeviceAvailable.

        ``route`` names the router the devices apply (None: the model's thresholds).
        """
        until = self.clock() + self.cfg.deadline_s
        n = images.shape[0]
        path = self.choose_path()
        if path == "cloud_direct":
            reply = await self._call("cloud", DeviceRequest(version, 0, StageInput(h=images), route), self.cfg.cloud_timeout_s, until)
            if reply is not None:
                return _assemble(n, "cloud_direct", [reply])
        edge = await self._call("edge", DeviceRequest(version, 0, StageInput(h=images), route), self.cfg.edge_timeout_s, until)
        if edge is None:
            if path == "cloud_direct":  # both tiers failed
                raise NoDeviceAvailable("no tier could answer within the deadline", got=f"{self.cfg.deadline_s}s", fix="retry after the Retry-After delay")
            reply = await self._call("cloud", DeviceRequest(version, 0, StageInput(h=images), route), self.cfg.cloud_timeout_s, until)
            if reply is None:
                raise NoDeviceAvailable("no tier could answer within the deadline", got=f"{self.cfg.deadline_s}s", fix="retry after the Retry-After delay")
            return _assemble(n, "cloud_direct", [reply])
        r = edge.result
        n_cont = int(r.cont.numel())
        self._escalate.update(n_cont / max(n, 1))
        self._edge_macs.update(float(r.macs.double().mean()))
        if not n_cont:
            return _assemble(n, "edge_first", [edge])
        cloud = await self._call("cloud", DeviceRequest(version, self.edge_stages, r.cont_input, route), self.cfg.cloud_timeout_s, until)
        return _assemble(n, "edge_first", [edge] if cloud is None else [edge, cloud], escalated=n_cont)


def _assemble(n: int, path: str, replies: list[DeviceReply], escalated: int = 0) -> Answer:
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
    for rep in replies:
        res = rep.result
        if res.rerouted is not None:
            rerouted[pos[res.rerouted]] = True
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
    return Answer(logits=logits, exit_index=exit_index, tier=tier, degraded=degraded, macs=macs, path=path, escalated=escalated, rerouted=rerouted)
