"""The model registry served through Ray, so models reach every node without a shared filesystem.

:class:`RegistryServer` is a detached, named Ray actor pinned to the node whose disk holds
the registry (the head, for ``dynray cluster up`` and ``dynray serve up``). It reads and
writes that :class:`dynray.registry.ModelRegistry`, and nothing else does on other nodes:

- a device, expert or ingress replica reads through :class:`RemoteRegistry`. ``load``
  fetches a version's files as bytes (:class:`dynray.registry_bytes.VersionBytes`, through
  the object store) and checks every sha256 *on the replica* before parsing a weight, so it
  never opens a registry path on its own node;
- a job registers through it (``jobs._ray.job_registry``), so a model trained on a worker node,
  or in a job's temporary working directory, lands in the registry ``dynray models list``
  reads on the head.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray
import torch

from dynray.errors import DynrayError, ServingError
from dynray.registry import LoadedModel, ModelInfo, ModelRegistry, RegistryReader, default_home
from dynray.registry_bytes import VersionBytes, verify_bytes

__all__ = ["REGISTRY_ACTOR", "NAMESPACE", "RegistryServer", "RemoteRegistry", "start_registry", "find_registry", "registry_for"]

log = logging.getLogger(__name__)

REGISTRY_ACTOR = "dynray-registry"
"""Name of the registry actor (in :data:`NAMESPACE`)."""
NAMESPACE = "dynray"
CALL_TIMEOUT_S = 60.0


class RegistryServer:
    """The registry at ``home`` on this actor's node, as Ray calls."""

    def __init__(self, home: str) -> None:
        self.reg = ModelRegistry(home)

    def home(self) -> str:
        return str(self.reg.home)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def resolve(self, ref: str | None = None) -> ModelInfo:
        return self.reg.resolve(ref)

    def list(self, name: str | None = None) -> list[ModelInfo]:
        return self.reg.list(name)

    def fetch(self, ref: str | None = None) -> VersionBytes:
        """The version's files as stored; the caller verifies them."""
        return self.reg.read_bytes(ref)

    def register(self, name: str, tensors: dict[str, torch.Tensor], meta: dict, parent: str | None = None) -> ModelInfo:
        return self.reg.register(name, tensors, meta, parent=parent)

    def promote(self, ref: str, stage: str) -> ModelInfo:
        return self.reg.promote(ref, stage)


def _call(method, *args, **kwargs):
    """A registry call, re-raising the registry's own error (not Ray's wrapper of it)."""
    try:
        return ray.get(method.remote(*args, **kwargs), timeout=CALL_TIMEOUT_S)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, DynrayError):
            raise e.cause from None
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        raise ServingError("the registry actor did not answer", got=type(e).__name__, fix="check `dynray cluster status`; `dynray serve up` starts the registry again") from e


class RemoteRegistry:
    """A :class:`dynray.registry.RegistryReader` (and writer) on a :class:`RegistryServer` handle.

    ``home`` is the registry's path on its own node, for messages: nothing here opens it.
    """

    def __init__(self, handle) -> None:
        self.handle = handle
        self.home = Path(_call(handle.home))

    def resolve(self, ref: str | None = None) -> ModelInfo:
        return _call(self.handle.resolve, ref)

    def list(self, name: str | None = None) -> list[ModelInfo]:
        return _call(self.handle.list, name)

    def load(self, ref: str | None = None) -> LoadedModel:
        vb: VersionBytes = _call(self.handle.fetch, ref)
        meta, tensors = verify_bytes(vb)  # here, on the receiving node
        info = ModelInfo(name=vb.name, version=vb.version, path=Path(vb.path), meta=meta, stages=vb.stages)
        return LoadedModel(info=info, tensors=tensors)

    def verify(self, ref: str | None = None) -> ModelInfo:
        return self.load(ref).info

    def register(self, name: str, tensors: dict[str, torch.Tensor], meta: dict, *, parent: str | None = None) -> ModelInfo:
        return _call(self.handle.register, name, {k: v.detach().cpu() for k, v in tensors.items()}, meta, parent)

    def promote(self, ref: str, stage: str) -> ModelInfo:
        return _call(self.handle.promote, ref, stage)


def find_registry():
    """The registry actor's handle, or None if this cluster runs none."""
    try:
        return ray.get_actor(REGISTRY_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None


def start_registry(home: str | Path | None = None, *, node_id: str | None = None):
    """Start the registry actor for ``home`` on ``node_id`` (default: this driver's node),
    or return the running one; refuse one that serves another home."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    home = str(default_home(home))
    existing = find_registry()
    if existing is None:
        node = node_id or ray.get_runtime_context().get_node_id()
        existing = (
            ray.remote(RegistryServer)
            .options(name=REGISTRY_ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=3,
                     scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
            .remote(home)
        )
    served = _call(existing.home)
    if served != home:
        raise ServingError("this cluster's registry actor serves another registry home", got={"running": served, "wanted": home},
                           fix=f"set DYNRAY_HOME={served}, or stop the cluster (`dynray cluster down`) and start it from this home")
    return existing


def registry_for(name: str | None, home: str | None) -> RegistryReader:
    """What a replica reads: the named registry actor when the app says so (never a local
    path then), else the local registry at ``home``."""
    if name is None:
        return ModelRegistry(default_home(home))
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise ServingError("the registry actor this app reads from is not running", got=name, fix="`dynray serve up` starts it; or deploy with registry: null to read a local path") from None
    return RemoteRegistry(handle)
