"""Typed arguments of the Serve application (the builder's args model) and its names.

``actors.app:build_app(args)`` takes :class:`AppArgs`; a Serve config file
(``cluster/serve.yaml``) passes the same fields under ``args:``. Runtime knobs that must
change without restarting replicas (the served model versions and the A/B split) are not
here: they travel as each deployment's ``user_config`` (:class:`DeviceUserConfig`,
:class:`IngressUserConfig`), so a version roll is a Serve ``reconfigure``.

The simulation parameters (``rtt_ms``, ``speed`` of each tier's profile) inject delay so one
machine can stand in for an edge/cloud cluster; set ``simulate: false`` on real
heterogeneous nodes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dynray.drift import DriftConfig
from dynray.routing.hybrid import HybridConfig
from dynray.serving.feedback import FeedbackConfig
from dynray.serving.scheduling import CLOUD_PROFILE, EDGE_PROFILE, DeviceProfile, policy_names

__all__ = [
    "SYSTEMS",
    "INGRESS",
    "EDGE",
    "CLOUD",
    "NOOP",
    "ROUTING_STATE",
    "expert_name",
    "TierArgs",
    "ExpertArgs",
    "IngressArgs",
    "FailoverArgs",
    "SchedulingArgs",
    "RouterArgs",
    "AuthArgs",
    "DetectArgs",
    "DriftArgs",
    "AppArgs",
    "DeviceUserConfig",
    "IngressUserConfig",
]

SYSTEMS = ("dynray", "all_cloud", "cloud_adaptive", "edge_only", "noop")
INGRESS, EDGE, CLOUD, NOOP = "Ingress", "Edge", "Cloud", "Noop"  # deployment names
ROUTING_STATE = "RoutingState"  # the routing state the ingress replicas share (when there are several)


def expert_name(e: int) -> str:
    """Deployment name of remote expert ``e``."""
    return f"Expert{e}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierArgs(_Strict):
    """One tier's deployment: replicas, autoscaling, batching and simulated profile."""

    min_replicas: int = Field(1, ge=0, description="autoscaling floor")
    max_replicas: int = Field(2, ge=1, description="autoscaling ceiling")
    initial_replicas: int | None = Field(None, ge=1, description="replicas at start (default: min, at least 1)")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaler target per replica")
    upscale_delay_s: float = Field(3.0, ge=0, description="autoscaler: how long the load must call for more replicas before one is added")
    downscale_delay_s: float = Field(30.0, ge=0, description="autoscaler: how long the load must call for fewer replicas before one is removed")
    look_back_period_s: float = Field(10.0, gt=0, description="autoscaler: window the ongoing-request average is taken over")
    metrics_interval_s: float = Field(2.0, gt=0, description="autoscaler: how often replicas and handles report their ongoing requests")
    max_batch_size: int = Field(32, ge=1, description="@serve.batch size limit")
    batch_wait_ms: float = Field(0.0, ge=0, description="@serve.batch wait for a batch to fill; 0 = adaptive: a batch takes whatever queued while the previous one ran")
    max_ongoing_requests: int = Field(64, ge=1, description="must be >= max_batch_size so batches can fill")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per replica; default {tier: 1}")
    num_cpus: float = Field(1.0, ge=1, description="logical CPUs each replica reserves, with its tier's resource: what the scheduler and the autoscaler see as its load")
    threads: int = Field(1, ge=1, description="torch intra-op threads per replica (Ray gives a 1-CPU actor one)")
    profile: dict = Field(default_factory=dict, description="DeviceProfile fields; default: the tier's standard profile")
    variants: dict[str, str] = Field(default_factory=dict, description="served ref -> registry ref of a compressed child this tier runs in its place (an int8 variant from `dynray compress int8`, which keeps the architecture, so the other tier continues from its features); answers and metrics keep the served version")

    @model_validator(mode="after")
    def _check(self) -> TierArgs:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size ({self.max_batch_size}): batches could never fill; raise max_ongoing_requests")
        if self.max_replicas < max(self.min_replicas, self.initial_replicas or 0):
            raise ValueError("max_replicas must be >= min_replicas and initial_replicas")
        return self

    def device_profile(self, tier: str) -> DeviceProfile:
        base = (EDGE_PROFILE if tier == "edge" else CLOUD_PROFILE).to_dict()
        return DeviceProfile.from_dict({**base, **self.profile, "tier": tier})


class ExpertArgs(_Strict):
    """Remote MoE experts: one Serve deployment per expert index (``Expert0``, ``Expert1``, ...)."""

    count: int = Field(0, ge=0, description="expert deployments; 0 = MoE experts run inside the device that runs their stage")
    replicas: int = Field(1, ge=1, description="replicas per expert deployment")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per expert replica; default {'cloud': 1}")
    num_cpus: float = Field(1.0, ge=1, description="logical CPUs each expert replica reserves")
    threads: int = Field(1, ge=1, description="torch intra-op threads per expert replica")
    timeout_ms: float = Field(2000.0, gt=0, description="one dispatch's deadline; an expert that misses it is failed over to the next-best expert")


class IngressArgs(_Strict):
    """The HTTP ingress: replicas, request limits, coalescing and the routing-state sync."""

    replicas: int = Field(2, ge=1, description="ingress replicas; with 2 or more one can die without a gap (they share routing state)")
    max_ongoing_requests: int = Field(256, ge=1, description="the ingress is pass-through; keep it high")
    max_items: int = Field(256, ge=1, description="batch limit per HTTP request")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="HTTP body size limit (checked while the body streams in)")
    coalesce_wait_ms: float = Field(0.0, ge=0, description="wait to coalesce concurrent requests into one edge call (0 = adaptive)")
    routing_sync_period_s: float = Field(0.5, gt=0, description="how often each replica pushes what it saw of the tiers and pulls the merged view (off the request path)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per ingress and routing-state replica (they reserve no CPU), e.g. {'node:__internal_head__': 0.001} to keep them on the head: a device node that hosts one never goes idle, so the autoscaler could never remove it")


class FailoverArgs(_Strict):
    """Deadlines, per-call timeouts, the per-tier circuit breaker and replica health checks."""

    deadline_ms: float = Field(3000.0, gt=0, description="per-request deadline across all retries")
    edge_timeout_ms: float = Field(1000.0, gt=0, description="timeout of one edge call")
    cloud_timeout_ms: float = Field(1000.0, gt=0, description="timeout of one cloud call before degrading")
    breaker_failures: int = Field(2, ge=1, description="consecutive failures (one per wave of calls in flight together) that mark a tier down")
    breaker_cooldown_ms: float = Field(1000.0, gt=0, description="how long a tier marked down is skipped before it is tried again")
    health_check_period_s: float = Field(1.0, gt=0, description="Serve health-check period of every deployment: fast replacement of killed replicas (~2.6 s at 1 s)")


class SchedulingArgs(_Strict):
    """Which replica of a tier gets a call."""

    policy: str = Field("latency", description="scheduling policy: latency, cost or balanced")
    replica_router: Literal["policy", "serve_default"] = Field("policy", description="the scheduling policy as a custom Serve request router, or Serve's power-of-two-choices")
    routing_stats_period_s: float = Field(0.5, gt=0, description="how often replicas report load to the request router")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in policy_names():
            raise ValueError(f"unknown scheduling policy {v!r}; known: {', '.join(policy_names())}")
        return v


class RouterArgs(_Strict):
    """The stop/escalate router and the operating point of the learned one."""

    kind: Literal["thresholds", "ppo", "hybrid"] = Field("thresholds", description="calibrated thresholds, the PPO policy, or hybrid (policy when sure, thresholds otherwise); a request may override it")
    lambda_cost: float = Field(0.01, ge=0, description="PPO/hybrid cost weight per cost unit (the operating point)")
    lambda_lat: float = Field(0.0005, ge=0, description="PPO/hybrid latency weight per ms")
    hybrid_min_confidence: float = Field(0.9, gt=0, le=1, description="least policy action probability at which the hybrid lets the policy decide")
    hybrid_rl_weight: float = Field(0.8, ge=0, le=1, description="hybrid's trust in the policy")


class AuthArgs(_Strict):
    """API keys and the global rate limit at the ingress (:mod:`dynray.serving.auth`)."""

    enabled: bool = Field(True, description="every /v1 endpoint but health needs an API key (`dynray keys create`); false serves anyone, for a trusted network only")
    cache_ttl_s: float = Field(0.5, gt=0, le=1.0, description="how long a replica trusts a key's verdict: a revocation takes effect everywhere within it")
    timeout_ms: float = Field(1000.0, gt=0, description="deadline of a key-store or limiter call; past it the request gets 503 (fail closed)")


class DetectArgs(_Strict):
    """What the ingress watches for, and what a flag does (:mod:`dynray.security.anomaly`)."""

    extraction: bool = Field(True, description="per-key model-extraction detector (needs auth: it follows API keys)")
    action: Literal["log", "throttle", "block"] = Field("log", description="on a flag: log it (and count it), throttle the key, or block it, on every ingress replica")
    throttle_factor: float = Field(10.0, ge=1, description="throttle: tokens each request of a flagged key costs")
    penalty_s: float = Field(3600.0, gt=0, description="how long a throttle or block lasts")
    window: int = Field(256, ge=8, description="latest queries per key the detector looks at")
    min_queries: int = Field(64, ge=8, description="no verdict before a key has sent this many (per ingress replica)")
    boundary_share: float | None = Field(None, gt=0, le=1, description="also flag a key when more of its window than this was answered near a decision boundary (None: off; the share depends on how confident the model is)")
    perturbed_share: float = Field(0.3, gt=0, le=1, description="...or when more than this were small perturbations of its earlier queries")


class DriftArgs(_Strict):
    """The drift detector at the ingress (:mod:`dynray.drift`): served traffic against the
    reference each version was calibrated with."""

    enabled: bool = Field(True, description="watch every answered request's complexity features and confidence")
    window: int = Field(100, ge=20, description="latest answered samples (per ingress replica) compared with the reference")
    check_every: int = Field(10, ge=1, description="samples between two tests")
    alpha: float = Field(1e-4, gt=0, lt=1, description="false-alarm probability of one test on traffic like the reference")
    min_effect: float = Field(0.4, gt=0, lt=1, description="least KS statistic that alarms (benign variation moves it by up to ~0.3)")
    on_alarm: Literal["log", "recalibrate"] = Field("log", description="on an alarm: log and count it, or also submit the recalibration job (`python -m jobs.calibrate --model VERSION`) to the cluster as a Ray job")
    recalibrate_args: list[str] = Field(default_factory=lambda: ["--max-drop", "0.002"], description="the recalibration job's target flags")
    recalibrate_cooldown_s: float = Field(3600.0, ge=0, description="at most one recalibration job per version and ingress replica in this many seconds")

    def config(self) -> DriftConfig:
        return DriftConfig(window=self.window, check_every=min(self.check_every, self.window), alpha=self.alpha, min_effect=self.min_effect)


class FeedbackArgs(_Strict):
    """Label feedback (``POST /v1/feedback``, :mod:`dynray.serving.feedback`): live accuracy per
    exit, and the hybrid router's trust learnt from labels."""

    enabled: bool = Field(True, description="remember answers so clients can send their true labels back")
    ttl_s: float = Field(900.0, gt=0, description="an answer can be labelled for this long")
    max_records: int = Field(200_000, ge=1, description="answers remembered at most (oldest dropped first)")
    window: int = Field(500, ge=1, description="latest labels per exit behind the live accuracy")
    prior_samples: float = Field(20.0, ge=0, description="weight (in labels) of the validation accuracy when the book estimates an answer the rules would have given deeper")
    adapt_rate: float = Field(0.02, ge=0, description="hybrid trust step per labelled request, times tanh(advantage / reward_scale)")

    def config(self) -> FeedbackConfig:
        return FeedbackConfig(ttl_s=self.ttl_s, max_records=self.max_records, window=self.window, prior_samples=self.prior_samples)


# flat names of the 0.x args (``ingress_replicas: 2``) -> their group; the group's field drops the prefix
_MOVED = {
    **{f"ingress_{f}" if f in ("replicas", "max_ongoing_requests") else f: ("ingress", f) for f in IngressArgs.model_fields},
    **{f: ("failover", f) for f in FailoverArgs.model_fields},
    **{f: ("scheduling", f) for f in SchedulingArgs.model_fields},
    **{f: ("router", f) for f in RouterArgs.model_fields if f != "kind"},
}


class AppArgs(_Strict):
    """Arguments of ``actors.app:build_app``: which system to serve and how.

    Grouped the way RLlib groups an algorithm config: the top level says what is served
    (system, models, split, the edge/cloud partition); each group configures one part:
    ``edge``/``cloud`` (:class:`TierArgs`), ``experts``, ``ingress``, ``failover``,
    ``scheduling``, ``router``, ``auth``, ``detect``, ``drift`` and ``feedback``.
    """

    system: Literal["dynray", "all_cloud", "cloud_adaptive", "edge_only", "noop"] = Field("dynray", description="dynray graph, or a baseline: all_cloud (the full network on the cloud tier), cloud_adaptive (the same early-exit network, all on the cloud tier), edge_only, noop")
    home: str | None = Field(None, description="registry directory (default: $DYNRAY_HOME or ./.dynray)")
    registry: str | None = Field(None, description="registry actor the replicas read models through (actors/registry.py; `dynray serve up` sets it): replicas then never open `home` on their own node. None: read the path `home`")
    models: list[str] = Field(default_factory=lambda: ["production"], description="registry refs served at start")
    weights: list[float] | None = Field(None, description="A/B traffic share per model (default: all to the first)")
    edge_stages: int = Field(2, ge=1, description="stages hosted on the edge tier; the cloud hosts the whole model")
    simulate: bool = Field(True, description="inject each profile's rtt and speed as delay (one-machine simulation)")
    edge: TierArgs = Field(default_factory=lambda: TierArgs(min_replicas=2, max_replicas=4))
    cloud: TierArgs = Field(default_factory=lambda: TierArgs(min_replicas=1, max_replicas=2))
    experts: ExpertArgs = Field(default_factory=ExpertArgs, description="remote MoE experts (count 0: local)")
    ingress: IngressArgs = Field(default_factory=IngressArgs)
    failover: FailoverArgs = Field(default_factory=FailoverArgs)
    scheduling: SchedulingArgs = Field(default_factory=SchedulingArgs)
    router: RouterArgs = Field(default_factory=RouterArgs)
    auth: AuthArgs = Field(default_factory=AuthArgs, description="API keys and rate limits (on by default)")
    detect: DetectArgs = Field(default_factory=DetectArgs, description="attack detectors at the ingress and what their flags do")
    drift: DriftArgs = Field(default_factory=DriftArgs, description="drift detection on the served traffic")
    feedback: FeedbackArgs = Field(default_factory=FeedbackArgs, description="label feedback: live accuracy per exit and the hybrid's learnt trust")

    @model_validator(mode="before")
    @classmethod
    def _flat_names(cls, data: object) -> object:
        """A flat name of the old args is an error that names its new place."""
        if not isinstance(data, dict):
            return data
        moved = {k: _MOVED[k] for k in data if k in _MOVED}
        if isinstance(data.get("router"), str):
            moved["router"] = ("router", "kind")
        if moved:
            k, (group, field) = next(iter(moved.items()))
            raise ValueError(f"`{k}` is now `{group}.{field}`: write `{group}: {{{field}: {data[k]!r}}}`"
                             + (f" (and {len(moved) - 1} more flat name(s): {', '.join(list(moved)[1:])})" if len(moved) > 1 else ""))
        return data

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if not self.models:
            raise ValueError("models must name at least one registry ref, e.g. ['production']")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"weights ({len(self.weights)}) must match models ({len(self.models)})")
        return self

    def hybrid(self) -> HybridConfig:
        """The hybrid router's trust settings (devices decide with them, the feedback adapts them)."""
        r = self.router
        return HybridConfig(min_confidence=r.hybrid_min_confidence, rl_weight=r.hybrid_rl_weight, adapt_rate=self.feedback.adapt_rate)

    def tiers(self) -> tuple[str, ...]:
        """Device tiers this system deploys."""
        return {"dynray": ("edge", "cloud"), "all_cloud": ("cloud",), "cloud_adaptive": ("cloud",), "edge_only": ("edge",), "noop": ()}[self.system]


class DeviceUserConfig(_Strict):
    """A device deployment's ``user_config``: changing it reconfigures replicas in place."""

    models: list[str] = Field(description="registry refs this device hosts (resolved to name:vN on load)")
    home: str | None = None
    variants: dict[str, str] = Field(default_factory=dict, description="served ref (as in models, or name:vN) -> the compressed child run in its place")


class IngressUserConfig(_Strict):
    """The ingress ``user_config``: which versions get traffic, and how much."""

    models: list[str]
    weights: list[float] | None = None
    home: str | None = None
