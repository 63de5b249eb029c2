"""One edge or cloud device: a Ray actor / Serve replica that runs a range of stages.

The same class runs as a plain Ray actor (``ray.remote(Device)``, for batch jobs and
simulations) and as a Serve deployment replica (``actors.app`` wraps it with
``serve.deployment``). It only wires things together: the stage execution is
:func:`dynray.serving.partition.run_stages`, the load bookkeeping :class:`dynray.serving.scheduling.LoadTracker`.

**Simulation parameters.** On one machine the profile's ``rtt_ms`` is injected as a
network delay around each call (half before, half after), and its ``speed`` factor as
extra compute time: after a batch really runs, the device stays busy for
``compute * (1/speed - 1)`` more, inside the batch slot, so a slow device really has less
capacity, not just more latency. ``simulate=False`` (real heterogeneous nodes) injects
nothing.

**MoE experts.** With ``experts`` (one handle per expert index, ``actors/expert.py``) the
MoE blocks of the hosted stages run their gate here and send each expert's tokens to its
host; without them the experts run in this process.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from actors.expert import attach_remote_experts
from actors.metrics import RaySink
from actors.registry import registry_for
from dynray.errors import RegistryError, ServingError
from dynray.serving import metrics as M
from dynray.serving.partition import DeviceReply, DeviceRequest, StageRange, StageResult, group_requests, run_stages, split_result
from dynray.routing.hybrid import HybridConfig, HybridRouter
from dynray.routing.policy import PolicyNet, find_policy, load_policy
from dynray.routing.rules import make_rule
from dynray.serving.scheduling import DeviceProfile, LoadTracker
from dynray.serving.config import DeviceUserConfig
from dynray.models.config import config_to_dict
from dynray.store import StoredModel, load_model

__all__ = ["Device"]

log = logging.getLogger(__name__)


def _replica_id() -> tuple[str, bool]:
    """(replica id, inside Serve?)"""
    try:
        return serve.get_replica_context().replica_id.unique_id, True
    except Exception:  # noqa: BLE001 - not inside Serve: a plain Ray actor (or a test)
        import ray

        return (ray.get_runtime_context().get_actor_id() or "local"), False


class Device:
    """Hosts stages ``[first_stage, last_stage)`` (``last_stage=None``: to the end) of every served version."""

    def __init__(
        self,
        *,
        profile: dict,
        first_stage: int = 0,
        last_stage: int | None = None,
        full: bool = False,
        simulate: bool = True,
        threads: int = 1,
        max_batch_size: int = 32,
        batch_wait_ms: float = 2.0,
        hybrid: dict | None = None,
        experts: list | None = None,
        expert_timeout_ms: float = 2000.0,
        user_config: dict | None = None,
        registry: str | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.registry = registry  # registry actor to read models through (None: the local path)
        self.profile = DeviceProfile.from_dict(profile)
        self.first_stage, self.last_stage, self.full, self.simulate = first_stage, last_stage, full, simulate
        self.tracker = LoadTracker()
        self.counts = {"forwards": 0, "requests": 0, "samples": 0, "max_requests": 0, "max_samples": 0, "compute_s": 0.0}  # batch fill, real compute time
        self.models: dict[str, StoredModel] = {}  # served version -> the model run for it (a tier variant, or itself)
        self.runs: dict[str, str] = {}  # served version -> the registry version run for it
        self.policies: dict[str, PolicyNet | None] = {}  # version -> its exported PPO router, if registered
        self.hybrids: dict[str, HybridRouter] = {}
        self.hybrid_cfg = HybridConfig(**(hybrid or {}))
        self.expert_hosts = list(experts or [])  # remote MoE experts (Serve handles or actors); [] = local
        self.expert_timeout_s = expert_timeout_ms / 1000
        self.replica, self._in_serve = _replica_id()
        self.metrics = RaySink()
        if self._in_serve:  # @serve.batch needs a replica context; plain actors batch per call
            self._batched.set_max_batch_size(max_batch_size)
            self._batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        if user_config is not None:  # plain-actor mode; Serve calls reconfigure itself
            self.reconfigure(user_config)

    # -- versions ------------------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        """Load every listed version, then swap them in at once (in-flight calls keep theirs)."""
        cfg = DeviceUserConfig(**user_config)
        reg = registry_for(self.registry, cfg.home)
        loaded: dict[str, StoredModel] = {}
        policies: dict[str, PolicyNet | None] = {}
        self.runs: dict[str, str] = {}
        for ref in cfg.models:
            concrete = reg.resolve(ref).ref
            variant = cfg.variants.get(ref) or cfg.variants.get(concrete)
            sm = self._variant(reg, concrete, variant) if variant else (self.models.get(concrete) or load_model(reg, concrete))
            self.runs[concrete] = sm.info.ref
            self._range(sm)  # refuse a model the configured stage range does not fit
            if self.expert_hosts and sm.model.moe_by_stage:
                attach_remote_experts(sm.model, concrete, self.expert_hosts, timeout_s=self.expert_timeout_s)
            loaded[concrete] = sm
            found = find_policy(reg, sm.info)
            policies[concrete] = load_policy(reg, found.ref, sm.info).policy if found is not None else None
        self.models, self.policies = loaded, policies
        self.hybrids = {v: HybridRouter(p, self.models[v].rule, self.hybrid_cfg) for v, p in policies.items() if self.models[v].rule is not None}
        log.info("%s %s hosts %s", self.profile.tier, self.replica, sorted(loaded))

    def versions(self) -> list[str]:
        return sorted(self.models)

    def hosting(self) -> dict[str, str]:
        """Served version -> the registry version this device really runs for it."""
        return dict(self.runs)

    def _variant(self, reg, served: str, ref: str) -> StoredModel:
        """A compressed child of ``served`` to run in its place: it must descend from it and keep its architecture."""
        sm = load_model(reg, ref)
        parent = load_model(reg, served)
        lineage = {sm.info.meta.get("parent"), sm.info.meta.get("compression", {}).get("parent")}
        if served not in lineage:
            raise ServingError("a tier variant must be a compressed child of the version it stands in for", got={"variant": sm.info.ref, "its parent": sm.info.meta.get("parent"), "served": served},
                               fix=f"make one with `dynray compress int8 --model {served}`")
        if config_to_dict(sm.model.cfg) != config_to_dict(parent.model.cfg):
            raise ServingError("a tier variant must keep the served version's architecture: the other tier continues from its features", got=sm.info.ref,
                               fix="use an int8 variant (`dynray compress int8`); serve a pruned or distilled variant as a version of its own")
        return sm

    def _range(self, sm: StoredModel, start: int | None = None) -> StageRange:
        k = sm.model.num_exits
        stop = k if self.last_stage is None else min(self.last_stage, k)
        first = self.first_stage if start is None else start
        if not self.first_stage <= first < stop:
            raise ServingError("this device does not host the requested stage", got=(first, self.first_stage, stop), fix="send the request to a device whose stage range covers it")
        return StageRange(start=first, stop=stop, full=self.full).check(sm.model)

    # -- serving -------------------------------------------------------------------
    async def run(self, req: DeviceRequest) -> DeviceReply:
        """Run one request (batched with concurrent ones) and report the live load."""
        if req.version not in self.models:
            raise RegistryError("this device does not host the requested version", got=req.version, fix=f"hosted: {', '.join(self.models) or '(none)'}; roll the version out first")
        self.tracker.start()
        t0 = time.perf_counter()
        try:
            if self.simulate:
                await asyncio.sleep(self.profile.rtt_ms / 2000)
            if self._in_serve:
                self.tracker.enqueue()
                result, ms_per_mmac = await self._batched(req)
            else:
                result, ms_per_mmac = (await self._compute([req]))[0]
            if self.simulate:
                await asyncio.sleep(self.profile.rtt_ms / 2000)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            self.tracker.finish(ms)
            self.metrics.observe(M.REPLICA_LATENCY_MS, ms, tags={M.TAG_TIER: self.profile.tier})
        return DeviceReply(result=result, tier=self.profile.tier, replica=self.replica, load=self.load(), ms_per_mmac=ms_per_mmac)

    async def __call__(self, req: DeviceRequest) -> DeviceReply:
        return await self.run(req)

    async def run_many(self, reqs: list[DeviceRequest]) -> list[DeviceReply]:
        """Plain-actor batch call: the requests share forwards per (version, start stage)."""
        out = await self._compute(list(reqs))
        return [DeviceReply(result=r, tier=self.profile.tier, replica=self.replica, load=self.load(), ms_per_mmac=m) for r, m in out]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, reqs: list[DeviceRequest]) -> list[tuple[StageResult, float]]:
        for _ in reqs:  # these left the queue and now hold the compute slot
            self.tracker.dequeue()
        return await self._compute(reqs)

    async def _compute(self, reqs: list[DeviceRequest]) -> list[tuple[StageResult, float]]:
        # one forward per (version, start stage): requests of one group share a batch
        out: list[tuple[StageResult, float] | None] = [None] * len(reqs)
        t0 = time.perf_counter()
        macs = 0
        for merged, idx, sizes in group_requests(reqs):
            self._count(len(idx), sum(sizes))
            sm = self.models[merged.version]
            v = merged.version
            rule = make_rule(merged.route, sm.rule, self.policies.get(v), self.hybrids.get(v), num_exits=sm.model.num_exits, on_cloud=self.profile.tier == "cloud")
            rng = self._range(sm, merged.start)
            if self.expert_hosts and any(rng.start <= k < rng.stop for k in sm.model.moe_by_stage):
                # remote experts block on their replies: off the event loop (Serve forbids .result() on it)
                res = await asyncio.to_thread(run_stages, sm.model, rng, merged.inp, rule)
            else:
                res = run_stages(sm.model, rng, merged.inp, rule)
            macs += int(res.macs.sum())
            self._record(v, res)
            for i, part in zip(idx, split_result(res, sizes), strict=True):
                out[i] = (part, 0.0)
        compute_s = time.perf_counter() - t0
        self.counts["compute_s"] += compute_s
        if self.simulate:  # the device stays busy for the extra time a slower device would need
            await asyncio.sleep(self.profile.slowdown_s(compute_s))
        ms_per_mmac = compute_s * 1000 / max(macs / 1e6, 1e-9)
        return [(res, ms_per_mmac) for res, _ in out]  # type: ignore[misc]

    def _record(self, version: str, res: StageResult) -> None:
        """Metrics of one forward: its batch size, the samples leaving at each exit, those continuing."""
        tier = self.profile.tier
        self.metrics.observe(M.BATCH_SIZE, res.batch_size, tags={M.TAG_TIER: tier})
        for k, n in zip(*torch.unique(res.exit_index, return_counts=True), strict=True):
            self.metrics.inc(M.DEVICE_EXITS, int(n), tags={M.TAG_VERSION: version, M.TAG_TIER: tier, M.TAG_EXIT: str(int(k))})
        if len(res.cont):
            self.metrics.inc(M.DEVICE_EXITS, len(res.cont), tags={M.TAG_VERSION: version, M.TAG_TIER: tier, M.TAG_EXIT: "continue"})

    def _count(self, requests: int, samples: int) -> None:
        c = self.counts
        c["forwards"] += 1
        c["requests"] += requests
        c["samples"] += samples
        c["max_requests"] = max(c["max_requests"], requests)
        c["max_samples"] = max(c["max_samples"], samples)

    def stats(self) -> dict:
        """How full the batches were: forwards run, and requests and samples per forward."""
        c = dict(self.counts)
        f = max(c["forwards"], 1)
        return {**c, "replica": self.replica, "mean_requests": c["requests"] / f, "mean_samples": c["samples"] / f, "mean_compute_ms": 1000 * c["compute_s"] / f}

    # -- load and health -----------------------------------------------------------
    def load(self) -> dict:
        return self.tracker.report(self.replica, self.profile, healthy=bool(self.models)).to_dict()

    def record_routing_stats(self) -> dict:
        """Serve polls this and hands it to the request router (actors.routing)."""
        return self.load()

    def check_health(self) -> None:
        """Serve replaces the replica when this raises."""
        if not self.models:
            raise ServingError("device hosts no model", fix="check the registry path and user_config.models")
