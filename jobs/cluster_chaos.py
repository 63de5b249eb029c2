"""Node-failure chaos on a local autoscaling cluster: kill a node's raylet under load.

On the fake multi-node cluster (``dynray cluster up --local``) every node is a real raylet
on this machine, started with ``RAY_OVERRIDE_NODE_ID_FOR_TESTING=<node id>``. A machine
that fails takes every process with it, so the kill is SIGKILL to the raylet *and* every
process under it (its workers, among them the replicas, and its agents). The raylet alone
is not enough: measured here, replicas whose raylet was killed went on answering for more
than 10 s (callers reach a worker directly, not through its raylet). The GCS then marks the
node dead, and the autoscaler (heartbeat timeout 10 s here) terminates it and launches a
replacement when the replicas Serve reschedules ask for one.

:func:`kill_node_under_load` runs the closed-loop load of :mod:`jobs.serve_chaos` and kills
the node hosting the most replicas of ``deployment``. ``recovery_s`` is the time until the
deployment has as many RUNNING replicas as before, all on live nodes; ``node_replaced_s``
until the cluster has as many live nodes of the victim's type as before. The caller owns
``ray.init``, the cluster and the deployed app.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass

import numpy as np

from dynray.errors import ServingError
from dynray.serving.config import EDGE
from jobs._ray import psutil
from jobs.serve_chaos import ChaosConfig, ChaosResult, running_replicas, under_load

__all__ = ["NodeKill", "kill_node_under_load", "raylet_of", "live_nodes_of_type"]

log = logging.getLogger(__name__)
NODE_ID_VAR = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"
"""How the fake multi-node provider names a node's processes (ray/autoscaler/_private/fake_multi_node)."""


@dataclass(frozen=True)
class NodeKill:
    """The node-kill part of the result (beside the ChaosResult's request counts)."""

    node_id: str
    node_type: str
    replicas_on_it: int
    node_replaced_s: float | None
    """Seconds until a live node of its type stood in for it (None: not within the timeout)."""
    node_dead_s: float | None = None
    """Seconds until the GCS marked the node dead (its health checks failed)."""


def raylet_of(node_id: str) -> psutil.Process:
    """The raylet process of a fake node."""
    for p in psutil.process_iter():
        try:
            if p.name() == "raylet" and p.environ().get(NODE_ID_VAR) == node_id:
                return p
        except psutil.Error:
            continue
    raise ServingError("no raylet process for this node on this machine", got=node_id, fix="node kills need the local fake cluster (`dynray cluster up --local`)")


def live_nodes_of_type(node_type: str) -> set[str]:
    from jobs.cluster import nodes_by_type

    return {n["node_id"] for n in nodes_by_type() if n["alive"] and n["type"] == node_type}


def _replicas_on(app: str, deployment: str, address: str) -> dict[str, int]:
    from actors.serve_apps import replica_nodes

    out: dict[str, int] = {}
    for r in replica_nodes(app, address).get(deployment, []):
        out[r["node_id"]] = out.get(r["node_id"], 0) + 1
    return out


def kill_node_under_load(cfg: ChaosConfig, images: np.ndarray, *, address: str, deployment: str = EDGE, node_type: str = "edge.worker",
                         replace_timeout_s: float = 90.0) -> tuple[ChaosResult, NodeKill]:
    """Kill the raylet of the ``node_type`` node hosting the most ``deployment`` replicas, under load."""
    from jobs.cluster import nodes_by_type

    types = {n["node_id"]: n["type"] for n in nodes_by_type() if n["alive"]}
    hosting = {nid: k for nid, k in _replicas_on(cfg.app, deployment, address).items() if types.get(nid) == node_type}
    if not hosting:
        raise ServingError(f"no {node_type} node hosts a {deployment} replica", got=types, fix="deploy the app on the cluster first (`dynray serve up`)")
    victim = max(hosting, key=hosting.get)
    before_nodes = len(live_nodes_of_type(node_type))
    before_replicas = running_replicas(cfg.app, deployment)
    replaced: dict[str, float | None] = {"s": None, "dead": None}

    def kill() -> tuple[str, float]:
        raylet = raylet_of(victim)
        doomed = [raylet, *raylet.children(recursive=True)]
        for p in doomed:  # together, as a machine failure would
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        log.info("killed %s node %s: its raylet and %d processes under it (%d %s replicas on it)", node_type, victim[-6:], len(doomed) - 1, hosting[victim], deployment)
        recovered = None
        while time.monotonic() - t0 < max(cfg.recovery_timeout_s, replace_timeout_s):
            now = time.monotonic() - t0
            live = live_nodes_of_type(node_type)
            if replaced["dead"] is None and victim not in live:
                replaced["dead"] = round(now, 2)
                log.info("node %s marked dead after %.1f s", victim[-6:], now)
            if replaced["s"] is None and victim not in live and len(live) >= before_nodes:
                replaced["s"] = round(now, 2)
            if recovered is None and victim not in live:
                on = _replicas_on(cfg.app, deployment, address)
                if running_replicas(cfg.app, deployment) >= before_replicas and victim not in on:
                    recovered = round(now, 2)
            if recovered is not None and replaced["s"] is not None:
                break
            time.sleep(0.5)
        return f"node {victim[-6:]} ({node_type})", recovered if recovered is not None else round(time.monotonic() - t0, 2)

    res = under_load(cfg, images, {"node": kill})
    return res, NodeKill(node_id=victim, node_type=node_type, replicas_on_it=hosting[victim], node_replaced_s=replaced["s"], node_dead_s=replaced["dead"])
