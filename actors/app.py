"""The Serve application: FastAPI ingress -> edge tier -> cloud tier, built by ``build_app``.

``build_app(args)`` composes deployments through handles (Serve's graph *is* deployments
bound to each other). ``args.system`` picks the dynray graph or one of the baselines the
serving benchmark compares against: ``all_cloud`` (the plain full model on one cloud
deployment), ``edge_only`` (the plain full model on the edge tier) and ``noop`` (the
overhead floor). The ingress only wires things: request decoding is
:mod:`dynray.serving.payload`, routing and failover :mod:`dynray.serving.failover`, the A/B split
:mod:`dynray.serving.split`.
"""

import asyncio
import logging
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from actors.device import Device
from actors.expert import ExpertHost
from dynray.serving import metrics as M
from dynray.errors import DynrayError, RequestError
from dynray.serving.failover import DeviceCall, FailoverConfig, Orchestrator
from dynray.serving.partition import DeviceReply, DeviceRequest, group_requests, split_reply
from dynray.serving.payload import ErrorResponse, PayloadLimits, PredictRequest, PredictResponse, decode_request
from dynray.registry import ModelRegistry, default_home
from dynray.routing.costs import RouteCosts
from dynray.routing.features import CostWeights
from dynray.routing.policy import find_policy
from dynray.routing.rules import ROUTERS, RouteContext
from dynray.serving.scheduling import NoDeviceAvailable, get_policy, request_cost
from dynray.serving.config import CLOUD, EDGE, INGRESS, NOOP, AppArgs, IngressUserConfig, TierArgs, expert_name
from dynray.serving.split import TrafficSplit

__all__ = ["build_app", "Ingress", "Noop", "api"]

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1

api = FastAPI(
    title="dynray",
    description="Adaptive inference: easy inputs leave at an edge exit, hard ones are escalated to the cloud tier.",
    version="0.1.0",
)


def _home(home: str | None) -> str:
    return str(default_home(home))


def _device_call(handle: DeploymentHandle) -> DeviceCall:
    async def call(req):
        resp = handle.run.remote(req)
        try:
            return await resp
        except asyncio.CancelledError:  # a timeout abandoned it: stop the work on the replica (RAY_NOTES §1d)
            resp.cancel()
            raise

    return call


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@serve.ingress(api)
class Ingress:
    """HTTP API of DESIGN.md: validation, A/B split, scheduling, failover, metrics."""

    def __init__(self, args: dict, edge: DeploymentHandle | None = None, cloud: DeploymentHandle | None = None) -> None:
        self.args = AppArgs.model_validate(args)
        self.handles = {"edge": edge, "cloud": cloud}
        self._edge_call = _device_call(edge) if edge is not None else None
        self._edge_coalesced.set_batch_wait_timeout_s(self.args.coalesce_wait_ms / 1000)
        self.policy = get_policy(self.args.policy)
        self.orch: Orchestrator | None = None
        self.split: TrafficSplit | None = None
        self.limits: PayloadLimits | None = None
        self._requests = Counter(M.REQUESTS, description="answered predict requests", tag_keys=(M.TAG_VERSION, M.TAG_PATH))
        self._samples = Counter(M.SAMPLES, description="answered samples", tag_keys=(M.TAG_VERSION, M.TAG_TIER))
        self._escalated = Counter(M.ESCALATED, description="samples escalated to the cloud", tag_keys=(M.TAG_VERSION,))
        self._degraded = Counter(M.DEGRADED, description="samples answered degraded", tag_keys=(M.TAG_VERSION,))
        self._unavailable = Counter(M.FAILOVERS, description="requests answered 503")
        self._rejected = Counter(M.REJECTED, description="4xx answers", tag_keys=(M.TAG_STATUS,))
        self._latency = Histogram(M.LATENCY_MS, description="ingress latency", boundaries=M.LATENCY_BOUNDARIES_MS, tag_keys=(M.TAG_VERSION,))
        self._status_cache: tuple[float, dict] = (0.0, {})

    def reconfigure(self, user_config: dict) -> None:
        """New versions or split: resolve refs, check they agree, rebuild the plan (no restart)."""
        cfg = IngressUserConfig(**user_config)
        reg = ModelRegistry(_home(cfg.home or self.args.home))
        infos = [reg.resolve(ref) for ref in cfg.models]
        shapes = {tuple(i.meta["config"]["input_shape"]) for i in infos}
        if len(shapes) != 1:
            raise DynrayError("served versions must share one input shape", got=sorted(shapes), fix="serve models trained on the same dataset")
        macs = infos[0].meta["macs"]
        k = self.args.edge_stages
        cum_edge = sum(macs["stage"][:1]) + macs["exit"][0]  # start estimate: every sample leaves at the first exit
        self.split = TrafficSplit.of([i.ref for i in infos], cfg.weights)
        found = {i.ref: find_policy(reg, i) for i in infos}
        self.routers = {ref: (r.ref if r is not None else None) for ref, r in found.items()}
        # the call times the routers were trained with (their "normal"); see Orchestrator.load_snapshot
        costs = next((r.meta["costs"] for r in found.values() if r is not None and r.meta.get("costs")), None)
        self.nominal_ms = {t: RouteCosts.from_dict(costs).typical_call_ms(t) for t in ("edge", "cloud")} if costs else None
        self.weights = CostWeights(cost=self.args.lambda_cost, lat=self.args.lambda_lat)
        self.limits = PayloadLimits(input_shape=shapes.pop(), max_items=self.args.max_items, max_body_bytes=self.args.max_body_bytes)
        self.profiles = {t: getattr(self.args, t).device_profile(t) for t in ("edge", "cloud")}
        self.orch = Orchestrator(
            FailoverConfig(deadline_s=self.args.deadline_ms / 1000, edge_timeout_s=self.args.edge_timeout_ms / 1000, cloud_timeout_s=self.args.cloud_timeout_ms / 1000),
            self.policy,
            edge=self._edge_coalesced if self.handles["edge"] else None,
            cloud=_device_call(self.handles["cloud"]) if self.handles["cloud"] else None,
            edge_stages=k,
            edge_macs=cum_edge,
            cloud_rest_macs=sum(macs["stage"][k:]) + sum(macs["exit"][k:]),
            full_macs=macs["full"],
            profiles=self.profiles,
        )

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=16)
    async def _edge_coalesced(self, reqs: list[DeviceRequest]) -> list[DeviceReply]:
        """Concurrent HTTP requests bound for the edge share one device call per version.

        Every hop costs RPC work on both ends; coalescing divides the ingress->edge part by
        the batch size. A failed call fails every request in it, and each is retried on its own.
        """
        groups = group_requests(reqs)
        replies = await asyncio.gather(*(self._edge_call(merged) for merged, _, _ in groups))
        out: list[DeviceReply | None] = [None] * len(reqs)
        for (_, idx, sizes), reply in zip(groups, replies, strict=True):
            for i, part in zip(idx, split_reply(reply, sizes), strict=True):
                out[i] = part
        return out

    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={s: {"model": ErrorResponse} for s in (400, 413, 415, 422, 503)},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}},
    )
    async def predict(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            declared = int(request.headers.get("content-length") or 0)
            if declared > self.limits.max_body_bytes:  # refuse before reading a huge body
                raise RequestError("request body too large", status=413, got=declared, fix=f"send at most {self.limits.max_body_bytes} bytes; split the batch")
            dec = decode_request(await request.body(), request.headers.get("content-type"), self.limits)
            router = dec.router or self.args.router
            if router not in ROUTERS:
                raise RequestError("unknown router", status=422, got=router, fix=f"use one of {', '.join(ROUTERS)} or omit it")
            version = self.split.pick(dec.model_version)
            if router == "ppo" and self.routers.get(version) is None:
                raise RequestError(f"no PPO router is registered for {version}", status=422, got=router, fix=f"train one with `dynray router train --model {version}`, or ask for 'hybrid' (falls back to thresholds) or 'thresholds'")
        except RequestError as e:
            self._rejected.inc(tags={M.TAG_STATUS: str(e.status)})
            return _error(e.status, e.message)
        route = None if router == "thresholds" else RouteContext(router, self.orch.load_snapshot(self.nominal_ms), self.weights)
        try:
            ans = await self.orch.answer(dec.images, version, route)
        except NoDeviceAvailable as e:
            self._unavailable.inc()
            return _error(503, e.message, {"Retry-After": str(RETRY_AFTER_S)})
        probs = torch.softmax(ans.logits, dim=1)
        macs_by_tier = {t: m.double() for t, m in ans.macs.items()}
        total_macs = sum(macs_by_tier.values())
        cost = request_cost({t: float(m.sum()) for t, m in macs_by_tier.items()}, self.profiles)
        self._record(version, ans)
        latency_ms = (time.perf_counter() - t0) * 1000
        self._latency.observe(latency_ms, tags={M.TAG_VERSION: version})
        return JSONResponse(
            {
                "predictions": probs.argmax(dim=1).tolist(),
                "probabilities": probs.tolist(),
                "exit": ans.exit_index.tolist(),
                "tier": ans.tier,
                "model_version": version,
                "router": router,
                "degraded": bool(ans.degraded.any() or ans.rerouted.any()),
                "latency_ms": latency_ms,
                "degraded_mask": ans.degraded.tolist(),
                "expert_rerouted": ans.rerouted.tolist(),
                "macs": total_macs.long().tolist(),
                "cost": cost,
                "path": ans.path,
            }
        )

    def _record(self, version: str, ans) -> None:
        self.split.record(version)
        self._requests.inc(tags={M.TAG_VERSION: version, M.TAG_PATH: ans.path})
        for tier in set(ans.tier):
            self._samples.inc(ans.tier.count(tier), tags={M.TAG_VERSION: version, M.TAG_TIER: tier})
        if ans.escalated:
            self._escalated.inc(ans.escalated, tags={M.TAG_VERSION: version})
        n_deg = int(ans.degraded.sum())
        if n_deg:
            self._degraded.inc(n_deg, tags={M.TAG_VERSION: version})

    def _deployments(self) -> dict:
        """Replica states per deployment from the controller, cached for a second."""
        at, cached = self._status_cache
        if time.monotonic() - at < 1.0:
            return cached
        app = serve.get_replica_context().app_name
        out = {}
        try:
            for name, d in serve.status().applications[app].deployments.items():
                out[name] = {"status": str(d.status.value), "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
        except Exception as e:  # noqa: BLE001 - health must answer even if the controller is busy
            log.warning("serve.status() failed: %s", e)
        self._status_cache = (time.monotonic(), out)
        return out

    @api.get("/v1/health")
    async def health(self) -> JSONResponse:
        deps = self._deployments()
        tiers = {}
        for tier, name in (("edge", EDGE), ("cloud", CLOUD)):
            if self.handles[tier] is None:
                continue
            running = deps.get(name, {}).get("replicas", {}).get("RUNNING", 0)
            tiers[tier] = {"up": running > 0 and self.orch.views[tier].available(time.monotonic()), "replicas": running}
        ready = self.orch is not None and any(t["up"] for t in tiers.values())
        body = {"status": "ok" if ready else "unavailable", "ready": ready, "tiers": tiers, "deployments": deps}
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse({**self.split.describe(), "system": self.args.system, "policy": self.args.policy, "edge_stages": self.args.edge_stages,
                             "router": self.args.router, "ppo_routers": self.routers, "router_load": self.orch.load_snapshot(self.nominal_ms).__dict__})


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
            health_check_period_s=args.health_check_period_s,
            graceful_shutdown_wait_loop_s=0.1,
            graceful_shutdown_timeout_s=1.0,
            user_config={"models": list(args.models), "home": home},
        )(ExpertHost).bind(expert=e, threads=x.threads)
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
            "upscale_delay_s": 3.0,
            "downscale_delay_s": 30.0,
            # react within seconds: Serve's defaults (10 s metrics, 30 s look-back) suit slower traffic shifts
            "metrics_interval_s": 2.0,
            "look_back_period_s": 10.0,
        },
        ray_actor_options={"num_cpus": t.num_cpus, "resources": t.resources or {tier: 1}},
        health_check_period_s=args.health_check_period_s,
        health_check_timeout_s=10.0,
        graceful_shutdown_wait_loop_s=0.1,
        graceful_shutdown_timeout_s=1.0,
        user_config={"models": list(args.models), "home": home},
    )
    if args.replica_router == "policy":
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class="actors.routing:LoadAwareRouter",
            request_router_kwargs={"policy": args.policy},
            request_routing_stats_period_s=args.routing_stats_period_s,
        )
    return serve.deployment(**opts)(Device).bind(
        profile=t.device_profile(tier).to_dict(),
        last_stage=last_stage,
        full=full,
        simulate=args.simulate,
        threads=t.threads,
        max_batch_size=t.max_batch_size,
        batch_wait_ms=t.batch_wait_ms,
        hybrid={"min_confidence": args.hybrid_min_confidence, "rl_weight": args.hybrid_rl_weight},
        experts=experts or None,
        expert_timeout_ms=args.experts.timeout_ms,
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
    elif args.system == "all_cloud":
        cloud = _device("cloud", CLOUD, args.cloud, args, home, last_stage=None, full=True, experts=experts)
    else:  # edge_only: the plain full model on edge devices
        edge = _device("edge", EDGE, args.edge, args, home, last_stage=None, full=True, experts=experts)
    ingress = serve.deployment(
        name=INGRESS,
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=args.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        user_config={"models": list(args.models), "weights": args.weights, "home": home},
        graceful_shutdown_wait_loop_s=0.1,
        graceful_shutdown_timeout_s=1.0,
    )(Ingress)
    return ingress.bind(args.model_dump(), edge, cloud)
