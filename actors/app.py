"""The Serve application: FastAPI ingress -> edge tier -> cloud tier, built by ``build_app``.

``build_app(args)`` composes deployments through handles (Serve's graph *is* deployments
bound to each other). ``args.system`` picks the dynray graph or one of the baselines the
serving benchmark compares against: ``all_cloud`` (the plain full model on one cloud
deployment), ``cloud_adaptive`` (the same early-exit model and rule, all on the cloud tier: what
early exit gains without the edge/cloud split), ``edge_only`` (the plain full model on the edge tier) and ``noop`` (the
overhead floor). The ingress only wires things: what it answers is
:class:`dynray.serving.ingress.IngressCore` (body reading, decoding, statuses, metrics),
routing and failover :mod:`dynray.serving.failover`; with several ingress replicas they
share their view of the tiers through the ``RoutingState`` deployment
(:mod:`dynray.serving.routing_state`), synced in the background, off the request path.
"""

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect

from actors.device import Device
from actors.expert import ExpertHost
from actors.keystore import start_keystore
from actors.metrics import RaySink
from actors.ratelimiter import start_ratelimiter
from actors.recalibrate import Recalibrator
from actors.registry import registry_for
from actors.routing_state import RoutingState
from dynray.errors import RequestError
from dynray.registry import default_home
from dynray.serving import metrics as M
from dynray.serving.auth import Gate
from dynray.serving.config import CLOUD, EDGE, INGRESS, NOOP, ROUTING_STATE, AppArgs, IngressUserConfig, TierArgs, expert_name
from dynray.serving.failover import DeviceCall
from dynray.serving.feedback import SharedFeedback
from dynray.serving.ingress import REQUEST_ID_HEADER, IngressCore, Reply, build_plan
from dynray.serving.partition import DeviceReply, DeviceRequest, group_requests, split_reply
from dynray.serving.payload import ErrorResponse, FeedbackRequest, FeedbackResponse, PredictRequest, PredictResponse
from dynray.serving.routing_state import ReplicaSync
from dynray.serving.scheduling import get_policy

__all__ = ["build_app", "Ingress", "Noop", "api"]

log = logging.getLogger(__name__)

api = FastAPI(
    title="dynray",
    description="Adaptive inference: easy inputs leave at an edge exit, hard ones are escalated to the cloud tier.",
    version="0.1.0",
)


def _home(home: str | None) -> str:
    return str(default_home(home))


async def _result(resp, timeout_s: float | None = None):
    """Await a DeploymentResponse; when a timeout (or the caller) abandons it, stop the work on the replica (RAY_NOTES §1d)."""
    try:
        if timeout_s is None:
            return await resp
        return await asyncio.wait_for(_result(resp), timeout_s)
    except (asyncio.CancelledError, TimeoutError):
        resp.cancel()
        raise


def _device_call(handle: DeploymentHandle) -> DeviceCall:
    async def call(req):
        return await _result(handle.run.remote(req))

    return call


def _timed(tier: str, call: DeviceCall, metrics: RaySink) -> DeviceCall:
    """``call``, with the latency of each one that answers recorded as the ingress saw it."""

    async def timed(req):
        t0 = time.perf_counter()
        reply = await call(req)
        metrics.observe(M.TIER_LATENCY_MS, (time.perf_counter() - t0) * 1000, tags={M.TAG_TIER: tier})
        return reply

    return timed


class _Failed:
    """One coalesced group's device call failed: every request in it gets this error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error if isinstance(error, Exception) else RuntimeError(f"edge call ended with {type(error).__name__}")


def _respond(reply: Reply) -> JSONResponse:
    # Serve's proxy puts the request's X-Request-Id (the one IngressCore read) on every response itself
    headers = {k: v for k, v in reply.headers.items() if k != REQUEST_ID_HEADER}
    return JSONResponse(reply.body, status_code=reply.status, headers=headers)


async def _chunks(request: Request):
    """The body as it arrives; a client that hangs up mid-body is its own 400, not our 500."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise RequestError("client disconnected before the body was complete", status=400, fix="send the whole body") from None


def _gate(args: AppArgs):
    """The ingress's key and rate checks through the key-store and limiter actors, and how a
    detector's flag reaches the limiter: ``(gate, penalise)``, ``(None, None)`` with auth off."""
    if not args.auth.enabled:
        return None, None
    # running already when `dynray serve up` deployed; started here (on the head) under `serve deploy` or a RayService
    keys, limiter = start_keystore(args.home), start_ratelimiter()

    async def verify(key: str):
        return await keys.verify.remote(key)

    async def take(kid: str, rate: float, burst: float):
        return await limiter.take.remote(kid, rate, burst)

    async def penalise(kid: str, action: str, factor: float, duration_s: float) -> None:
        await limiter.penalise.remote(kid, action, factor, duration_s)

    return Gate(verify, take, ttl_s=args.auth.cache_ttl_s, timeout_s=args.auth.timeout_ms / 1000), penalise


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (a test): one local origin
        return "local"


@serve.ingress(api)
class Ingress:
    """HTTP API of DESIGN.md: the endpoints of ``IngressCore``, device calls, the routing-state sync."""

    def __init__(self, args: dict, edge: DeploymentHandle | None = None, cloud: DeploymentHandle | None = None, state: DeploymentHandle | None = None) -> None:
        self.args = AppArgs.model_validate(args)
        self.handles = {"edge": edge, "cloud": cloud}
        self._edge_call = _device_call(edge) if edge is not None else None
        self._cloud_call = _device_call(cloud) if cloud is not None else None
        self._edge_coalesced.set_batch_wait_timeout_s(self.args.ingress.coalesce_wait_ms / 1000)
        self.policy = get_policy(self.args.scheduling.policy)
        self.replica = _replica_id()
        gate, penalise = _gate(self.args)
        self.metrics = RaySink()
        d = self.args.drift
        on_drift = Recalibrator(home=self.args.home, args=d.recalibrate_args, cooldown_s=d.recalibrate_cooldown_s) if d.on_alarm == "recalibrate" else None
        period = self.args.ingress.routing_sync_period_s
        # several replicas: the labels of any replica's answers go to the book in RoutingState
        self.shared_feedback = SharedFeedback(self._send_label, retry_s=2 * period + 0.25) if state is not None and self.args.feedback.enabled else None
        self.core = IngressCore(self.args, self.metrics, tiers=tuple(t for t, h in self.handles.items() if h is not None), gate=gate, penalise=penalise,
                                replica=self.replica, on_drift=on_drift, feedback=self.shared_feedback)
        self._status_cache: tuple[float, dict] = (0.0, {})
        self._state = state
        # Serve runs the constructor on the replica's event loop; the sync never blocks a request
        loop = asyncio.get_running_loop()
        self._sync_task = loop.create_task(self._sync_forever()) if state is not None else None
        self._gauge_task = loop.create_task(self._gauges_forever()) if self.core.drift is not None or self.core.feedback is not None else None

    def reconfigure(self, user_config: dict) -> None:
        """New versions or split: resolve refs, check they agree, rebuild the plan (no restart)."""
        cfg = IngressUserConfig(**user_config)
        edge = _timed("edge", self._edge, self.metrics) if self._edge_call else None
        cloud = _timed("cloud", self._cloud_call, self.metrics) if self._cloud_call else None
        plan = build_plan(self.args, cfg, self.policy, edge=edge, cloud=cloud, origin=self.replica,
                          previous=self.core.plan, registry=registry_for(self.args.registry, cfg.home or self.args.home))
        self.core.configure(plan)

    async def _send_label(self, request_id: str, labels: list[int], records: list) -> dict:
        return await _result(self._state.label.remote(request_id, labels, records), max(2.0, 4 * self.args.ingress.routing_sync_period_s))

    async def _sync_forever(self) -> None:
        """Every period: push this replica's view of the tiers (and its answers awaiting labels)
        to RoutingState, apply the merge (and the hybrid's learnt trust)."""
        sync, period, failing = ReplicaSync(self.replica), self.args.ingress.routing_sync_period_s, False
        fb = self.shared_feedback
        while True:
            await asyncio.sleep(period)
            orch = self.core.orch
            if orch is None:
                continue
            records = fb.take_pending() if fb is not None else []
            try:
                shared = await _result(self._state.sync.remote(sync.observation(orch, orch.clock()), records), max(2.0, 4 * period))
                sync.apply(orch, shared, orch.clock())
                if fb is not None:
                    fb.apply(shared.rl_weight)
                if failing:
                    log.info("routing state reachable again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the replica keeps routing on its own view meanwhile
                if fb is not None:
                    fb.restore(records)
                if not failing:
                    log.warning("routing state sync failed (%s: %s); routing on this replica's own view until it is back", type(e).__name__, str(e)[:200])
                failing = True

    async def _gauges_forever(self) -> None:
        """Keep the drift score and feedback gauges on the metrics endpoint while traffic pauses."""
        while True:
            await asyncio.sleep(5.0)
            try:
                self.core.export_gauges()
            except Exception:  # noqa: BLE001 - a missed refresh only leaves a gap in the series
                log.exception("could not refresh the drift and feedback gauges")

    def __del__(self) -> None:
        for name in ("_sync_task", "_gauge_task"):
            if getattr(self, name, None) is not None:
                getattr(self, name).cancel()

    async def _edge(self, req: DeviceRequest) -> DeviceReply:
        out = await self._edge_coalesced(req)
        if isinstance(out, _Failed):
            raise out.error
        return out

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=16)
    async def _edge_coalesced(self, reqs: list[DeviceRequest]) -> list[DeviceReply | _Failed]:
        """Concurrent HTTP requests bound for the edge share one device call per version.

        Every hop costs RPC work on both ends; coalescing divides the ingress->edge part by
        the batch size. A failed call fails the requests in it (one failure for the breaker:
        they were in flight together), and each is retried on its own.
        """
        groups = group_requests(reqs)
        replies = await asyncio.gather(*(self._edge_call(merged) for merged, _, _ in groups), return_exceptions=True)
        out: list[DeviceReply | _Failed | None] = [None] * len(reqs)
        for (_, idx, sizes), reply in zip(groups, replies, strict=True):
            if isinstance(reply, BaseException):
                for i in idx:
                    out[i] = _Failed(reply)
                continue
            for i, part in zip(idx, split_reply(reply, sizes), strict=True):
                out[i] = part
        return out

    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 413, 415, 422, 429, 500, 503)},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}},
    )
    async def predict(self, request: Request) -> JSONResponse:
        return _respond(await self.core.predict(_chunks(request), request.headers))

    def _deployments(self) -> dict:
        """Replica states per deployment from the controller, cached for a second."""
        at, cached = self._status_cache
        if time.monotonic() - at < 1.0:
            return cached
        out = {}
        try:
            app = serve.get_replica_context().app_name
            for name, d in serve.status().applications[app].deployments.items():
                out[name] = {"status": str(d.status.value), "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
        except Exception as e:  # noqa: BLE001 - health must answer even if the controller is busy
            log.warning("serve.status() failed: %s", e)
        self._status_cache = (time.monotonic(), out)
        return out

    @api.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 422, 429, 500)},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}}}},
    )
    async def feedback(self, request: Request) -> JSONResponse:
        return _respond(await self.core.label(_chunks(request), request.headers))

    @api.get("/v1/health")
    async def health(self, request: Request) -> JSONResponse:
        return _respond(self.core.health(self._deployments(), request.headers))

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        return _respond(await self.core.models(request.headers))

    @api.get("/v1/admin/security")
    async def security(self, request: Request) -> JSONResponse:
        return _respond(await self.core.security(request.headers))


@serve.deployment(name=NOOP, max_ongoing_requests=64, graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=1)
class Noop:
    """The overhead floor: reads the body and answers a constant, with no model."""

    async def __call__(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"predictions": [0]})


def _experts(args: AppArgs, home: str) -> list:
    """One deployment per expert index; each hosts that expert of every served MoE block."""
    x = args.experts
    return [
        serve.deployment(
            name=expert_name(e),
            num_replicas=x.replicas,
            max_ongoing_requests=64,
            ray_actor_options={"num_cpus": x.num_cpus, "resources": x.resources or {"cloud": 1}},
            health_check_period_s=args.failover.health_check_period_s,
            graceful_shutdown_wait_loop_s=0.1,
            graceful_shutdown_timeout_s=1.0,
            user_config={"models": list(args.models), "home": home},
        )(ExpertHost).bind(expert=e, threads=x.threads, registry=args.registry)
        for e in range(x.count)
    ]


def _device(tier: str, name: str, t: TierArgs, args: AppArgs, home: str, *, last_stage: int | None, full: bool, experts: list | None = None):
    opts = dict(
        name=name,
        max_ongoing_requests=t.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": t.min_replicas,
            "max_replicas": t.max_replicas,
            "initial_replicas": t.initial_replicas or max(t.min_replicas, 1),
            "target_ongoing_requests": t.target_ongoing_requests,
            # react within seconds: Serve's defaults (10 s metrics, 30 s look-back) suit slower traffic shifts
            "upscale_delay_s": t.upscale_delay_s,
            "downscale_delay_s": t.downscale_delay_s,
            "metrics_interval_s": t.metrics_interval_s,
            "look_back_period_s": t.look_back_period_s,
        },
        ray_actor_options={"num_cpus": t.num_cpus, "resources": t.resources or {tier: 1}},
        health_check_period_s=args.failover.health_check_period_s,
        health_check_timeout_s=10.0,
        graceful_shutdown_wait_loop_s=0.1,
        graceful_shutdown_timeout_s=1.0,
        user_config={"models": list(args.models), "home": home, **({"variants": dict(t.variants)} if t.variants else {})},
    )
    if args.scheduling.replica_router == "policy":
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class="actors.routing:LoadAwareRouter",
            request_router_kwargs={"policy": args.scheduling.policy},
            request_routing_stats_period_s=args.scheduling.routing_stats_period_s,
        )
    return serve.deployment(**opts)(Device).bind(
        profile=t.device_profile(tier).to_dict(),
        last_stage=last_stage,
        full=full,
        simulate=args.simulate,
        threads=t.threads,
        max_batch_size=t.max_batch_size,
        batch_wait_ms=t.batch_wait_ms,
        hybrid={"min_confidence": args.router.hybrid_min_confidence, "rl_weight": args.router.hybrid_rl_weight},
        experts=experts or None,
        expert_timeout_ms=args.experts.timeout_ms,
        registry=args.registry,
    )


def build_app(args: AppArgs | dict):
    """Serve application builder (``import_path: actors.app:build_app``)."""
    args = AppArgs.model_validate(args) if not isinstance(args, AppArgs) else args
    if args.system == "noop":
        return Noop.bind()
    home = _home(args.home)
    args = args.model_copy(update={"home": home})
    edge = cloud = None
    experts = _experts(args, home)  # shared by both tiers: the gate runs wherever its stage runs
    if args.system == "dynray":
        edge = _device("edge", EDGE, args.edge, args, home, last_stage=args.edge_stages, full=False, experts=experts)
        cloud = _device("cloud", CLOUD, args.cloud, args, home, last_stage=None, full=False, experts=experts)
    elif args.system in ("all_cloud", "cloud_adaptive"):  # every request cloud_direct; full network or exits
        cloud = _device("cloud", CLOUD, args.cloud, args, home, last_stage=None, full=args.system == "all_cloud", experts=experts)
    else:  # edge_only: the plain full model on edge devices
        edge = _device("edge", EDGE, args.edge, args, home, last_stage=None, full=True, experts=experts)
    state = None
    if args.ingress.replicas > 1:  # one replica needs nobody to share with
        state = serve.deployment(
            name=ROUTING_STATE,
            num_replicas=1,
            max_ongoing_requests=256,
            ray_actor_options={"num_cpus": 0, "resources": dict(args.ingress.resources)},
            health_check_period_s=args.failover.health_check_period_s,
            graceful_shutdown_wait_loop_s=0.1,
            graceful_shutdown_timeout_s=1.0,
        )(RoutingState).bind(expire_s=max(3.0, 6 * args.ingress.routing_sync_period_s),
                             feedback=args.feedback.model_dump() if args.feedback.enabled else None, hybrid=args.hybrid().__dict__)
    ingress = serve.deployment(
        name=INGRESS,
        num_replicas=args.ingress.replicas,
        max_ongoing_requests=args.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0, "resources": dict(args.ingress.resources)},
        user_config={"models": list(args.models), "weights": args.weights, "home": home},
        health_check_period_s=args.failover.health_check_period_s,
        graceful_shutdown_wait_loop_s=0.1,
        graceful_shutdown_timeout_s=1.0,
    )(Ingress)
    return ingress.bind(args.model_dump(), edge, cloud, state)
