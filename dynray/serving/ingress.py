"""What the HTTP ingress answers, without Ray or FastAPI: the served plan and the endpoints.

``actors/app.py`` wires this onto FastAPI and Serve: it builds the device calls, hands each
request's body chunks and headers to :class:`IngressCore`, and sends the :class:`Reply`.
Every status an answer can get is decided here, so unit tests cover it:

- before the first reconfigure there is no :class:`ServedPlan`: health, models and predict
  answer 503 JSON (``{"error": "not ready ..."}``), never a 500;
- with a :class:`~dynray.serving.auth.Gate`, every endpoint but health first checks the API
  key and the caller's rate: 401 (no or bad key), 403 (scope), 429 (with Retry-After), 503
  when the key store or limiter is down; each answered request of a key feeds the per-key
  extraction detector, whose flag is logged, counted (``dynray_security_flags_total``),
  listed by ``GET /v1/admin/security`` and, as configured, throttles or blocks the key;
- a client error is its 4xx ``{"error"}``; no tier is 503 with Retry-After; anything
  unexpected is 500 ``{"error": "internal error", "request_id"}``, logged with the id and
  counted under ``dynray_errors_total{status="500"}``;
- every reply carries ``X-Request-Id``: the client's own when it sent a plain one, else a new id.
  (Behind Serve's proxy the request always has one: the proxy puts the client's or a fresh
  id on the request and on its response.)
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import torch

from dynray.errors import DynrayError, RequestError
from dynray.registry import ModelRegistry, RegistryReader, default_home
from dynray.routing.costs import RouteCosts
from dynray.routing.features import CostWeights
from dynray.routing.policy import find_policy
from dynray.routing.rules import ROUTERS, RouteContext
from dynray.drift import DriftReference
from dynray.security.anomaly import ExtractionConfig, ExtractionDetector
from dynray.serving import metrics as M
from dynray.serving.drift import DriftWatch, OnAlarm
from dynray.serving.auth import Admitted, Gate, Refusal
from dynray.serving.config import CLOUD, EDGE, AppArgs, IngressUserConfig
from dynray.serving.failover import Answer, DeviceCall, FailoverConfig, Orchestrator
from dynray.serving.feedback import MAX_FEEDBACK_BYTES, AnswerRecord, FeedbackBook, FeedbackStore, LocalFeedback, exit_costs, parse_feedback
from dynray.serving.payload import PayloadLimits, decode_request, read_body
from dynray.serving.scheduling import DeviceProfile, NoDeviceAvailable, SchedulingPolicy, request_cost
from dynray.serving.split import TrafficSplit

__all__ = ["RETRY_AFTER_S", "REQUEST_ID_HEADER", "Reply", "ServedPlan", "build_plan", "request_id", "IngressCore"]

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1
REQUEST_ID_HEADER = "X-Request-Id"
_PLAIN_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII: safe to log and to send back
Penalise = Callable[[str, str, float, float], Awaitable[None]]
_NOT_READY = "not ready: the ingress has no served model versions yet (its first reconfigure has not finished)"


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, JSON body, headers."""

    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ServedPlan:
    """Everything a reconfigure resolves: the versions, their split and limits, the request plan."""

    split: TrafficSplit
    limits: PayloadLimits
    orch: Orchestrator
    profiles: dict[str, DeviceProfile]
    routers: dict[str, str | None]
    """Served version -> its registered PPO router's ref, or None."""
    nominal_ms: dict[str, float] | None = None
    """Call times the routers were trained with (see ``Orchestrator.load_snapshot``)."""
    weights: CostWeights = field(default_factory=CostWeights)
    references: dict[str, DriftReference | None] = field(default_factory=dict)
    """Served version -> the drift reference saved at its calibration (None: none saved)."""
    exit_costs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Served version -> cost units of an answer at each exit (edge-first path), for label feedback."""
    reference_accuracy: dict[str, float] = field(default_factory=dict)
    """Served version -> its validation accuracy at the last exit (label feedback's prior)."""


def build_plan(args: AppArgs, cfg: IngressUserConfig, policy: SchedulingPolicy, *, edge: DeviceCall | None, cloud: DeviceCall | None,
               origin: str = "local", previous: ServedPlan | None = None, registry: RegistryReader | None = None) -> ServedPlan:
    """Resolve ``cfg``'s refs in ``registry`` (default: the local one at ``cfg.home``/``args.home``),
    check they agree, and build the plan.

    The new orchestrator keeps what ``previous`` learnt about the tiers (breaker, loads).
    """
    reg = registry if registry is not None else ModelRegistry(default_home(cfg.home or args.home))
    infos = [reg.resolve(ref) for ref in cfg.models]
    shapes = {tuple(i.meta["config"]["input_shape"]) for i in infos}
    if len(shapes) != 1:
        raise DynrayError("served versions must share one input shape", got=sorted(shapes), fix="serve models trained on the same dataset")
    macs = infos[0].meta["macs"]
    k = args.edge_stages
    found = {i.ref: find_policy(reg, i) for i in infos}
    # the call times the routers were trained with (their "normal"); see Orchestrator.load_snapshot
    costs = next((r.meta["costs"] for r in found.values() if r is not None and r.meta.get("costs")), None)
    profiles = {t: getattr(args, t).device_profile(t) for t in ("edge", "cloud")}
    f = args.failover
    orch = Orchestrator(
        FailoverConfig(deadline_s=f.deadline_ms / 1000, edge_timeout_s=f.edge_timeout_ms / 1000, cloud_timeout_s=f.cloud_timeout_ms / 1000,
                       failures_to_trip=f.breaker_failures, cooldown_s=f.breaker_cooldown_ms / 1000),
        policy,
        edge=edge,
        cloud=cloud,
        edge_stages=k,
        edge_macs=sum(macs["stage"][:1]) + macs["exit"][0],  # start estimate: every sample leaves at the first exit
        cloud_rest_macs=sum(macs["stage"][k:]) + sum(macs["exit"][k:]),
        full_macs=macs["full"],
        profiles=profiles,
        origin=origin,
    )
    if previous is not None:
        orch.adopt(previous.orch)
    return ServedPlan(
        split=TrafficSplit.of([i.ref for i in infos], cfg.weights),
        limits=PayloadLimits(input_shape=shapes.pop(), max_items=args.ingress.max_items, max_body_bytes=args.ingress.max_body_bytes),
        orch=orch,
        profiles=profiles,
        routers={ref: (r.ref if r is not None else None) for ref, r in found.items()},
        nominal_ms={t: RouteCosts.from_dict(costs).typical_call_ms(t) for t in ("edge", "cloud")} if costs else None,
        weights=CostWeights(cost=args.router.lambda_cost, lat=args.router.lambda_lat),
        references={i.ref: DriftReference.from_meta(i.meta) for i in infos},
        exit_costs={i.ref: exit_costs(i.meta["macs"]["stage"], i.meta["macs"]["exit"], k, {t: p.cost_per_mmac for t, p in profiles.items()}) for i in infos},
        reference_accuracy={i.ref: _reference_accuracy(i.meta) for i in infos},
    )


def _reference_accuracy(meta: dict) -> float:
    """Validation accuracy of the last exit, as training or calibration recorded it (1.0 if neither did)."""
    acc = meta.get("metrics", {}).get("val_exit_accuracy") or [meta.get("calibration", {}).get("val_reference_accuracy", 1.0)]
    return float(acc[-1])


def request_id(given: str | None) -> str:
    """The client's ``X-Request-Id`` if it is plain (1-128 visible ASCII characters), else a fresh one."""
    if given and _PLAIN_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex[:16]


class IngressCore:
    """The ingress's state and endpoints; ``plan`` is None until the first :meth:`configure`."""

    def __init__(self, args: AppArgs, metrics: M.MetricsSink, *, tiers: tuple[str, ...], gate: Gate | None = None,
                 penalise: Penalise | None = None, on_drift: OnAlarm | None = None, replica: str = "local", feedback: FeedbackStore | None = None) -> None:
        """``gate``: API keys and rate limits for every endpoint but health (None: open to anyone).
        ``penalise(key_id, action, factor, duration_s)``: throttle or block a flagged key on
        every replica (the limiter actor); the extraction detector runs only with a gate.
        ``on_drift(version, alarm)``: called when the drift watch raises an alarm. ``replica``:
        this replica's id (each replica watches the requests it answers). ``feedback``: where
        answers wait for labels (None: this replica's own book, when ``args.feedback.enabled``)."""
        self.args, self.metrics, self.tiers, self.gate, self.penalise, self.replica = args, metrics, tiers, gate, penalise, replica
        if feedback is None and args.feedback.enabled:
            feedback = LocalFeedback(FeedbackBook(args.feedback.config(), args.hybrid()))
        self.feedback = feedback
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # the feedback gauges' latest values, re-set by export_gauges
        self.plan: ServedPlan | None = None
        self.flags: deque[dict] = deque(maxlen=256)
        """The detectors' latest flags on this replica (``GET /v1/admin/security``)."""
        d = args.detect
        self.extraction = ExtractionDetector(ExtractionConfig(window=d.window, min_queries=d.min_queries, boundary_share=d.boundary_share,
                                                                 perturbed_share=d.perturbed_share)) if gate is not None and d.extraction else None
        self._tasks: set[asyncio.Task] = set()
        self.drift = DriftWatch(args.drift.config(), metrics, on_alarm=on_drift) if args.drift.enabled else None

    async def admit(self, headers: Mapping[str, str], scope: str, rid: str) -> Admitted | Reply:
        """The gate's verdict on a request: Admitted, or the refusal to send (counted)."""
        if self.gate is None:
            return Admitted(None)
        got = await self.gate.admit(headers, scope, rid)
        if isinstance(got, Refusal):
            if got.status == 429:
                self.metrics.inc(M.RATE_LIMITED)
            if got.status >= 500:
                self.metrics.inc(M.ERRORS, tags={M.TAG_STATUS: str(got.status)})
            else:
                self.metrics.inc(M.REJECTED, tags={M.TAG_STATUS: str(got.status)})
            return Reply(got.status, got.body, {REQUEST_ID_HEADER: rid, **got.headers})
        return got

    def configure(self, plan: ServedPlan) -> None:
        if self.drift is not None:
            self.drift.serve({v: plan.references.get(v) for v in plan.split.versions})
        self.plan = plan  # one assignment: a request in flight keeps the plan it started with

    @property
    def orch(self) -> Orchestrator | None:
        return self.plan.orch if self.plan is not None else None

    # -- POST /v1/predict -------------------------------------------------------------
    async def predict(self, chunks: AsyncIterable[bytes], headers: Mapping[str, str]) -> Reply:
        """Answer one predict request. ``headers``: lower-case names (Starlette's are case-insensitive)."""
        reply = await self._predict(chunks, headers)
        try:
            self.metrics.inc(M.RESPONSES, tags={M.TAG_STATUS: str(reply.status)})
        except Exception:  # noqa: BLE001 - counting must never change the answer
            log.exception("could not count a %d response", reply.status)
        return reply

    async def _predict(self, chunks: AsyncIterable[bytes], headers: Mapping[str, str]) -> Reply:
        rid = request_id(headers.get("x-request-id"))
        ids = {REQUEST_ID_HEADER: rid}
        t0 = time.perf_counter()
        try:
            who = await self.admit(headers, "predict", rid)
            if isinstance(who, Reply):
                return who
            plan = self.plan
            if plan is None:
                raise NoDeviceAvailable(_NOT_READY, fix="retry after the Retry-After delay; GET /v1/health answers 200 once ready")
            body = await read_body(chunks, plan.limits.max_body_bytes, headers.get("content-length"))
            dec = decode_request(body, headers.get("content-type"), plan.limits)
            router = dec.router or self.args.router.kind
            if router not in ROUTERS:
                raise RequestError("unknown router", status=422, got=router, fix=f"use one of {', '.join(ROUTERS)} or omit it")
            version = plan.split.pick(dec.model_version)
            if router == "ppo" and plan.routers.get(version) is None:
                raise RequestError(f"no PPO router is registered for {version}", status=422, got=router, fix=f"train one with `dynray router train --model {version}`, or ask for 'hybrid' (falls back to thresholds) or 'thresholds'")
            trust = self.feedback.weight(version) if router == "hybrid" and self.feedback is not None else None
            route = None if router == "thresholds" else RouteContext(router, plan.orch.load_snapshot(plan.nominal_ms), plan.weights, rl_weight=trust)
            ans = await plan.orch.answer(dec.images, version, route)
            latency_ms = (time.perf_counter() - t0) * 1000
            probs = torch.softmax(ans.logits, dim=1)
            out = _answer_body(ans, probs, plan, version, router, latency_ms)
            self._record(plan, version, ans, latency_ms)
            if self.feedback is not None:
                self.feedback.remember(_answer_record(rid, plan, version, router, ans, probs))
            if self.drift is not None:
                self.drift.observe(version, dec.images, probs)
            if who.key_id is not None and self.extraction is not None:
                self._watch(who.key_id, dec.images, probs, rid)
            return Reply(200, out, ids)
        except RequestError as e:
            self.metrics.inc(M.REJECTED, tags={M.TAG_STATUS: str(e.status)})
            return Reply(e.status, {"error": e.message, "request_id": rid}, ids)
        except NoDeviceAvailable as e:
            self.metrics.inc(M.FAILOVERS)
            self.metrics.inc(M.ERRORS, tags={M.TAG_STATUS: "503"})
            return Reply(503, {"error": e.message, "request_id": rid}, {**ids, "Retry-After": str(RETRY_AFTER_S)})
        except Exception:  # noqa: BLE001 - the catch-all: a bug answers a JSON 500 with the id to quote, never a bare traceback
            return self._internal_error(rid, "predict")

    # -- POST /v1/feedback ------------------------------------------------------------
    async def label(self, chunks: AsyncIterable[bytes], headers: Mapping[str, str]) -> Reply:
        """A client's true label(s) for an earlier answer: live accuracy, and the hybrid's trust."""
        rid = request_id(headers.get("x-request-id"))
        ids = {REQUEST_ID_HEADER: rid}
        try:
            who = await self.admit(headers, "predict", rid)
            if isinstance(who, Reply):
                return who
            if self.feedback is None:
                raise RequestError("label feedback is off on this app", status=404, fix="serve with `feedback: {enabled: true}` in the app's args")
            answered, labels = parse_feedback(await read_body(chunks, MAX_FEEDBACK_BYTES, headers.get("content-length")))
            done = await self.feedback.label(answered, labels)
            self._count_labels(done)
            return Reply(200, {"request_id": answered, **done.to_dict()}, ids)
        except RequestError as e:
            self.metrics.inc(M.REJECTED, tags={M.TAG_STATUS: str(e.status)})
            return Reply(e.status, {"error": e.message, "request_id": rid}, ids)
        except Exception:  # noqa: BLE001 - a JSON 500 with the id to quote
            return self._internal_error(rid, "feedback")

    def _count_labels(self, done) -> None:
        v = done.version
        for (k, ok), n in Counter(zip(done.exits, done.correct, strict=True)).items():
            self.metrics.inc(M.FEEDBACK_LABELS, n, tags={M.TAG_VERSION: v, M.TAG_EXIT: str(k), M.TAG_RESULT: "correct" if ok else "wrong"})
        for k, acc in done.accuracy.items():
            self._gauges[(M.LIVE_ACCURACY, ((M.TAG_VERSION, v), (M.TAG_EXIT, str(k))))] = acc
        if done.rl_weight is not None:
            self._gauges[(M.RL_WEIGHT, ((M.TAG_VERSION, v),))] = done.rl_weight
        self.export_gauges(drift=False)

    def export_gauges(self, *, drift: bool = True) -> None:
        """Set the gauges again (Ray drops a gauge ~20 s after its last set): the feedback's, and the drift scores."""
        for (name, tags), value in self._gauges.items():
            self.metrics.set(name, value, tags=dict(tags))
        if drift and self.drift is not None:
            self.drift.export_gauges()

    def _watch(self, key_id: str, images: torch.Tensor, probs: torch.Tensor, rid: str) -> None:
        """Feed the extraction detector; on a flag: log, count, remember, and act."""
        flag = self.extraction.observe(key_id, images, probs)
        if flag is None:
            return
        d = self.args.detect
        log.warning("security flag: %s key %s (score %.2f): %s; action %s (request_id=%s)", flag.detector, key_id, flag.score, flag.reason, d.action, rid)
        self.metrics.inc(M.FLAGS, tags={M.TAG_DETECTOR: flag.detector, M.TAG_ACTION: d.action})
        self.flags.append({**flag.to_dict(), "action": d.action, "request_id": rid})
        if d.action != "log" and self.penalise is not None:
            task = asyncio.ensure_future(self._apply(key_id, d.action, d.throttle_factor, d.penalty_s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _apply(self, key_id: str, action: str, factor: float, duration_s: float) -> None:
        try:
            await asyncio.wait_for(self.penalise(key_id, action, factor, duration_s), 5.0)
        except Exception:  # noqa: BLE001 - the flag stays logged and counted; the next flag on this replica (after a restart) retries
            log.exception("could not %s key %s on the limiter", action, key_id)

    def _internal_error(self, rid: str, endpoint: str) -> Reply:
        log.exception("internal error in %s, request_id=%s", endpoint, rid)
        try:
            self.metrics.inc(M.ERRORS, tags={M.TAG_STATUS: "500"})
        except Exception:  # noqa: BLE001 - counting must not turn the 500 into a crash
            log.exception("could not count the internal error, request_id=%s", rid)
        return Reply(500, {"error": "internal error", "request_id": rid}, {REQUEST_ID_HEADER: rid})

    def _record(self, plan: ServedPlan, version: str, ans: Answer, latency_ms: float) -> None:
        plan.split.record(version)
        self.metrics.inc(M.REQUESTS, tags={M.TAG_VERSION: version, M.TAG_PATH: ans.path})
        for tier in set(ans.tier):
            self.metrics.inc(M.SAMPLES, ans.tier.count(tier), tags={M.TAG_VERSION: version, M.TAG_TIER: tier})
        for (tier, k), n in Counter(zip(ans.tier, ans.exit_index.tolist(), strict=True)).items():
            self.metrics.inc(M.EXITS, n, tags={M.TAG_VERSION: version, M.TAG_TIER: tier, M.TAG_EXIT: str(k)})
        if ans.escalated:
            self.metrics.inc(M.ESCALATED, ans.escalated, tags={M.TAG_VERSION: version})
        n_deg = int(ans.degraded.sum())
        if n_deg:
            self.metrics.inc(M.DEGRADED, n_deg, tags={M.TAG_VERSION: version})
        self.metrics.observe(M.LATENCY_MS, latency_ms, tags={M.TAG_VERSION: version})

    # -- GET /v1/health, /v1/models ----------------------------------------------------
    def health(self, deployments: Mapping[str, dict], headers: Mapping[str, str] | None = None) -> Reply:
        """Readiness: 200 when a tier is up. ``deployments``: name -> {"status", "replicas": {state: n}}."""
        rid = request_id((headers or {}).get("x-request-id"))
        try:
            plan, now = self.plan, time.monotonic()
            tiers = {}
            for tier, name in (("edge", EDGE), ("cloud", CLOUD)):
                if tier not in self.tiers:
                    continue
                running = deployments.get(name, {}).get("replicas", {}).get("RUNNING", 0)
                tiers[tier] = {"up": plan is not None and running > 0 and plan.orch.views[tier].available(now), "replicas": running}
            ready = plan is not None and any(t["up"] for t in tiers.values())
            body = {"status": "ok" if ready else "unavailable", "ready": ready, "tiers": tiers, "deployments": dict(deployments)}
            if plan is None:
                body["error"] = _NOT_READY
            elif not ready:
                body["error"] = "no tier is up: " + ", ".join(f"{t} ({v['replicas']} running)" for t, v in tiers.items())
            return Reply(200 if ready else 503, body, {REQUEST_ID_HEADER: rid})
        except Exception:  # noqa: BLE001
            return self._internal_error(rid, "health")

    async def models(self, headers: Mapping[str, str] | None = None) -> Reply:
        """The served versions, the A/B split and the routers; 503 before the first reconfigure."""
        headers = headers or {}
        rid = request_id(headers.get("x-request-id"))
        ids = {REQUEST_ID_HEADER: rid}
        try:
            who = await self.admit(headers, "predict", rid)
            if isinstance(who, Reply):
                return who
            plan = self.plan
            if plan is None:
                return Reply(503, {"error": _NOT_READY, "request_id": rid}, {**ids, "Retry-After": str(RETRY_AFTER_S)})
            a = self.args
            return Reply(200, {**plan.split.describe(), "system": a.system, "policy": a.scheduling.policy, "edge_stages": a.edge_stages, "router": a.router.kind,
                               "ppo_routers": plan.routers, "router_load": plan.orch.load_snapshot(plan.nominal_ms).__dict__,
                               "drift": {**self.drift.status(), "replica": self.replica} if self.drift is not None else {"enabled": False},
                               "feedback": self.feedback.status() if self.feedback is not None else {"enabled": False}}, ids)
        except Exception:  # noqa: BLE001
            return self._internal_error(rid, "models")


    # -- GET /v1/admin/security --------------------------------------------------------
    async def security(self, headers: Mapping[str, str] | None = None) -> Reply:
        """What this replica enforces and what its detectors flagged; needs the ``admin`` scope."""
        headers = headers or {}
        rid = request_id(headers.get("x-request-id"))
        try:
            who = await self.admit(headers, "admin", rid)
            if isinstance(who, Reply):
                return who
            a = self.args.auth
            d = self.args.detect
            return Reply(200, {"auth": {"enabled": self.gate is not None, "cache_ttl_s": a.cache_ttl_s, "timeout_ms": a.timeout_ms},
                               "detect": {"extraction": self.extraction is not None, "action": d.action},
                               "flags": list(self.flags), "request_id": rid}, {REQUEST_ID_HEADER: rid})
        except Exception:  # noqa: BLE001
            return self._internal_error(rid, "security")


def _answer_record(rid: str, plan: ServedPlan, version: str, router: str, ans: Answer, probs: torch.Tensor) -> AnswerRecord:
    t = ans.route_trace
    return AnswerRecord(
        request_id=rid, version=version, router=router, exit=tuple(ans.exit_index.tolist()), pred=tuple(probs.argmax(dim=1).tolist()),
        degraded=tuple(ans.degraded.tolist()),
        override=() if t is None else tuple(t.override.tolist()), rule_exit=() if t is None else tuple(t.rule_exit.tolist()),
        rule_pred=() if t is None else tuple(t.rule_pred.tolist()),
        num_classes=int(probs.shape[1]), exit_cost=plan.exit_costs.get(version) or (0.0,) * (int(ans.exit_index.max()) + 1),
        lambda_cost=plan.weights.cost, reference_accuracy=plan.reference_accuracy.get(version, 1.0), at=time.time(),
    )


def _answer_body(ans: Answer, probs: torch.Tensor, plan: ServedPlan, version: str, router: str, latency_ms: float) -> dict:
    macs_by_tier = {t: m.double() for t, m in ans.macs.items()}
    total_macs = sum(macs_by_tier.values())
    rerouted = ans.rerouted if ans.rerouted is not None else torch.zeros_like(ans.degraded)
    return {
        "predictions": probs.argmax(dim=1).tolist(),
        "probabilities": probs.tolist(),
        "exit": ans.exit_index.tolist(),
        "tier": ans.tier,
        "model_version": version,
        "router": router,
        "degraded": bool(ans.degraded.any() or rerouted.any()),
        "latency_ms": latency_ms,
        "degraded_mask": ans.degraded.tolist(),
        "expert_rerouted": rerouted.tolist(),
        "macs": total_macs.long().tolist(),
        "cost": request_cost({t: float(m.sum()) for t, m in macs_by_tier.items()}, plan.profiles),
        "path": ans.path,
        "device_failures": ans.device_failures,
        "failed_calls": ans.failed_calls,
    }
