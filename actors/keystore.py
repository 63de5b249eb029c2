"""The API-key store served through Ray: one named actor owns ``$DYNRAY_HOME/keys.db``.

Ingress replicas on any node verify keys through :class:`KeyServer`, pinned to the node
whose disk holds the database (the head for ``dynray serve up`` and ``dynray cluster up``),
so no replica opens a key file on its own node. The actor reads SQLite on every call (no
cache of its own): ``dynray keys revoke`` on the head writes the same file, and the
replicas' short verdict cache (:class:`dynray.serving.auth.Gate`, at most 1 s) is the only
delay before a revocation holds. The pepper is read in the actor's process, from its
environment or ``~/.config/dynray/pepper`` on the head (:func:`dynray.security.keys.load_pepper`).
"""

from __future__ import annotations

from pathlib import Path

import ray

from dynray.errors import ServingError
from dynray.security.keys import KeyStore, Verified, keys_path, load_pepper

__all__ = ["KEYSTORE_ACTOR", "NAMESPACE", "KeyServer", "start_keystore", "find_keystore", "head_node_id"]

KEYSTORE_ACTOR = "dynray-keystore"
NAMESPACE = "dynray"


class KeyServer:
    """The :class:`KeyStore` at ``path`` on this actor's node."""

    def __init__(self, path: str) -> None:
        self.store = KeyStore(path, load_pepper())

    def path(self) -> str:
        return str(self.store.path)

    async def verify(self, key: str) -> Verified:
        return self.store.verify(key)


def find_keystore():
    """The key-store actor's handle, or None if this cluster runs none."""
    try:
        return ray.get_actor(KEYSTORE_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None


def head_node_id() -> str:
    """The head node's id (where the registry, the key store and the limiter live)."""
    for n in ray.nodes():
        if n["Alive"] and "node:__internal_head__" in n["Resources"]:
            return n["NodeID"]
    raise ServingError("no live head node in this cluster", fix="check `dynray cluster status`")


def start_keystore(home: str | Path | None = None, *, node_id: str | None = None):
    """Start the key-store actor for ``home``'s ``keys.db`` on ``node_id`` (default: the head),
    or return the running one; refuse one that serves another database."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = str(keys_path(home).resolve())
    existing = find_keystore()
    if existing is None:
        existing = (
            ray.remote(KeyServer)
            .options(name=KEYSTORE_ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=3,
                     max_concurrency=1000, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id or head_node_id(), soft=False))
            .remote(path)
        )
    served = ray.get(existing.path.remote(), timeout=60)
    if served != path:
        raise ServingError("this cluster's key-store actor serves another key database", got={"running": served, "wanted": path},
                           fix=f"set DYNRAY_HOME to {str(Path(served).parent)!r}, or stop the cluster and start it from this home")
    return existing
