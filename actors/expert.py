"""MoE experts as Ray actors or Serve deployments, and the runner that calls them.

:class:`ExpertHost` hosts expert ``e`` of every MoE block of the versions it is configured
with. The same class runs as a plain Ray actor (``ray.remote(ExpertHost)``, see
:func:`spawn_expert_actors`) and as a Serve deployment (``actors.app`` builds one per
expert index, ``Expert0..ExpertN-1``, with the devices' ``user_config``, so a version roll
reconfigures them too).

:class:`RemoteExperts` is the :class:`dynray.models.moe.ExpertRunner` the MoE blocks call:
the gate runs where the stage runs, and all the tokens for expert ``i`` go to host ``i`` in
one call; the calls for different experts are in flight together. An expert whose call
fails or times out is reported failed, and the block reroutes its tokens to the next-best
expert by gate score (``dynray/models/moe.py``), so no request is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from actors.metrics import RaySink
from actors.registry import registry_for
from dynray.errors import RegistryError, ServingError
from dynray.models.moe import ExpertReplies
from dynray.registry import ModelRegistry, default_home
from dynray.serving import metrics as M
from dynray.serving.config import DeviceUserConfig
from dynray.store import load_model

__all__ = ["ExpertHost", "RemoteExperts", "spawn_expert_actors", "attach_remote_experts"]

log = logging.getLogger(__name__)


class ExpertHost:
    """Expert ``expert`` of every MoE block of the hosted versions (eval mode)."""

    def __init__(self, *, expert: int, threads: int = 1, user_config: dict | None = None, registry: str | None = None) -> None:
        torch.set_num_threads(threads)
        self.registry = registry  # registry actor to read models through (None: the local path)
        self.expert = expert
        self.modules: dict[tuple[str, int], nn.Module] = {}  # (version, block) -> this expert's module
        self.calls = 0
        self.metrics = RaySink()
        if user_config is not None:  # plain-actor mode; Serve calls reconfigure itself
            self.reconfigure(user_config)

    def reconfigure(self, user_config: dict) -> None:
        """Load the listed versions and keep only this expert of each MoE block."""
        cfg = DeviceUserConfig(**user_config)
        reg = registry_for(self.registry, cfg.home)
        modules: dict[tuple[str, int], nn.Module] = {}
        for ref in cfg.models:
            sm = load_model(reg, reg.resolve(ref).ref)
            for block in sm.model.moe_blocks():
                if self.expert < block.cfg.num_experts:
                    modules[(sm.info.ref, block.block)] = block.experts[self.expert].eval()
        self.modules = modules
        log.info("expert %d hosts %s", self.expert, sorted(modules))

    @torch.no_grad()
    def run(self, version: str, block: int, x: torch.Tensor) -> torch.Tensor:
        """x: [n, *D] every token routed to this expert in block ``block`` -> [n, *D]."""
        mod = self.modules.get((version, block))
        if mod is None:
            raise RegistryError("this expert does not host the requested MoE block", got=(version, block, self.expert), fix="roll the version out to the expert deployments first")
        self.calls += 1
        t0 = time.perf_counter()
        y = mod(x)
        n = int(x.shape[0])
        if n:
            self.metrics.inc(M.EXPERT_TOKENS, n, tags={M.TAG_VERSION: version, M.TAG_EXPERT: str(self.expert)})
        self.metrics.observe(M.BATCH_SIZE, n, tags={M.TAG_TIER: "expert"})
        self.metrics.observe(M.REPLICA_LATENCY_MS, (time.perf_counter() - t0) * 1000, tags={M.TAG_TIER: "expert"})
        return y

    def __call__(self, version: str, block: int, x: torch.Tensor) -> torch.Tensor:
        return self.run(version, block, x)

    def stats(self) -> dict:
        return {"expert": self.expert, "calls": self.calls, "hosts": sorted(f"{v}/{b}" for v, b in self.modules)}

    def check_health(self) -> None:
        if not self.modules:
            raise ServingError("expert hosts no MoE block", fix="serve an MoE model (dynray train --arch moe)")


def _wait(pending: object, timeout_s: float) -> torch.Tensor:
    """Result of an actor call (ObjectRef) or a Serve call (DeploymentResponse)."""
    import ray

    if isinstance(pending, ray.ObjectRef):
        return ray.get(pending, timeout=timeout_s)
    return pending.result(timeout_s=timeout_s)  # type: ignore[attr-defined]


@dataclass
class RemoteExperts:
    """ExpertRunner over remote hosts: ``hosts[i]`` runs expert i (actor or Serve handle)."""

    version: str
    hosts: Sequence[object]
    timeout_s: float = 2.0

    def run(self, block: int, batches: dict[int, torch.Tensor]) -> ExpertReplies:
        until = time.monotonic() + self.timeout_s
        pending = {e: self.hosts[e].run.remote(self.version, block, x) for e, x in batches.items()}  # type: ignore[attr-defined]
        outputs: dict[int, torch.Tensor] = {}
        failed: set[int] = set()
        for e, p in pending.items():
            try:
                outputs[e] = _wait(p, max(0.001, until - time.monotonic()))
            except Exception as err:  # noqa: BLE001 - any failure of one expert is failed over, never a lost request
                log.warning("expert %d of block %d failed (%s: %s); rerouting its %d tokens", e, block, type(err).__name__, str(err)[:200], batches[e].shape[0])
                if hasattr(p, "cancel"):
                    p.cancel()  # a timed-out Serve call keeps running otherwise (RAY_NOTES §1d)
                failed.add(e)
        return ExpertReplies(outputs=outputs, failed=frozenset(failed))


def attach_remote_experts(model, version: str, hosts: Sequence[object], *, timeout_s: float = 2.0) -> None:
    """Make ``model``'s MoE blocks call ``hosts`` (checks there is a host per expert)."""
    need = max((b.cfg.num_experts for b in model.moe_blocks()), default=0)
    if need > len(hosts):
        raise ServingError("fewer expert hosts than the model has experts", got={"experts": need, "hosts": len(hosts)}, fix=f"start {need} expert hosts (experts.count: {need} in the Serve config)")
    model.set_expert_runner(RemoteExperts(version, list(hosts), timeout_s))


def spawn_expert_actors(ref: str, *, home: str | None = None, count: int | None = None, resources: dict | None = None, threads: int = 1) -> tuple[str, list]:
    """One Ray actor per expert of a registered MoE model: (concrete ref, actor handles).

    The caller owns ``ray.init``. Actors are placed by ``resources`` (e.g. ``{"cloud": 1}``
    on a cluster with cloud node types); the default asks for nothing but a slot.
    """
    import ray

    home = str(default_home(home))
    reg = ModelRegistry(home)
    info = reg.resolve(ref)
    moe = (info.meta.get("config") or {}).get("moe")
    if not moe:
        raise ServingError("model has no MoE stage", got=info.ref, fix="pick a model trained with `dynray train --arch moe`")
    n = count or int(moe["num_experts"])
    actor = ray.remote(num_cpus=0, resources=resources or {})(ExpertHost)
    uc = {"models": [info.ref], "home": home}
    hosts = [actor.options(name=None).remote(expert=e, threads=threads, user_config=uc) for e in range(n)]
    ray.get([h.stats.remote() for h in hosts])  # wait until every expert is loaded (errors surface here)
    return info.ref, hosts
