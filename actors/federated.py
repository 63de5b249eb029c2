"""Federated clients as Ray actors on ``edge`` nodes, and the server's round loop (FedAvg).

Each :class:`FederatedClientActor` is one device: it loads its own shard on its node (the
driver sends indices, never images) and hosts a :class:`dynray.federated.client.LocalClient`.
:func:`run_federated` is the server: per round it broadcasts the global weights (one object,
with their sha256), waits for the updates up to a deadline, treats a client that died or is
late as dropped (its update, if it comes later, is discarded), unmasks the sum under secure
aggregation, applies FedAvg and evaluates. A dropped actor restarts (a device that reboots)
and takes part again from the next round. Bytes are counted from the payloads that arrive.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch

from dynray.data import Split, load_dataset
from dynray.errors import DynrayError, IntegrityError, ServingError
from dynray.evaluation import full_accuracy
from dynray.federated.client import ClientUpdate, LocalClient
from dynray.federated.server import FedConfig, RoundRecord, Server
from dynray.federated.split import dirichlet_split, label_histogram
from dynray.models.build import build
from dynray.models.config import DynamicNetConfig
from dynray.training import TrainConfig

__all__ = ["FederatedClientActor", "DropPlan", "FedRun", "run_federated"]
log = logging.getLogger(__name__)


class FederatedClientActor:
    """One device holding one shard (wrapped by ``ray.remote`` in :func:`run_federated`)."""

    def __init__(self, client_id: int, dataset: str, indices: list[int], model: DynamicNetConfig, recipe: TrainConfig, fed: FedConfig, data_root: str | None) -> None:
        torch.set_num_threads(1)
        train = load_dataset(dataset, "train", root=data_root)
        idx = torch.tensor(indices, dtype=torch.long)
        shard = dataclasses.replace(train, images=train.images[idx].contiguous(), labels=train.labels[idx].contiguous())
        self.client = LocalClient(client_id, shard, model, recipe, fed.codec, local_epochs=fed.local_epochs)

    def placement(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "resources": ctx.get_assigned_resources()}

    def public_key(self, round_: int) -> bytes:
        return self.client.public_key(round_)

    def train_round(self, round_: int, weights: bytes, digest: str, weight: float, peers: dict[int, bytes] | None) -> ClientUpdate:
        return self.client.train_round(round_, weights, digest, weight, peers)

    def correction(self, round_: int, dropped: list[int]) -> bytes:
        return self.client.correction(round_, dropped)


@dataclass(frozen=True, kw_only=True)
class DropPlan:
    """Kill one client's actor while it trains in one round (a device lost mid-round)."""

    client: int
    round: int
    after_s: float = 0.5


@dataclass(frozen=True)
class FedRun:
    model: torch.nn.Module
    records: list[RoundRecord]
    histogram: list[list[int]]  # samples per class per client
    placement: list[dict]

    @property
    def bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.records)

    @property
    def bytes_down(self) -> int:
        return sum(r.bytes_down for r in self.records)


def _get(ref, timeout: float):
    return ray.get(ref, timeout=timeout)


def run_federated(
    cfg: FedConfig,
    *,
    dataset: str,
    model: DynamicNetConfig,
    recipe: TrainConfig,
    test: Split | None,
    tier: str = "edge",
    cpus_per_client: float = 1.0,
    round_timeout_s: float = 300.0,
    drop: DropPlan | None = None,
    data_root: str | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> FedRun:
    """FedAvg over ``cfg.clients`` device actors placed on ``tier`` nodes."""
    labels = load_dataset(dataset, "train", root=data_root).labels
    shards = dirichlet_split(labels, cfg.clients, alpha=cfg.alpha, seed=cfg.seed, min_size=2 * recipe.batch_size)
    recipe = dataclasses.replace(recipe, dataset=dataset, model=model, epochs=cfg.rounds * cfg.local_epochs, seed=cfg.seed, data_root=data_root)
    remote = ray.remote(max_restarts=-1, max_task_retries=0)(FederatedClientActor)
    actors = [remote.options(num_cpus=cpus_per_client, resources={tier: 1}, name=None).remote(i, dataset, s.tolist(), model, recipe, cfg, data_root) for i, s in enumerate(shards)]
    try:
        try:
            placement = ray.get([a.placement.remote() for a in actors], timeout=round_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ServingError(f"the {cfg.clients} client actors could not be placed on `{tier}` nodes within {round_timeout_s:.0f} s", got=ray.cluster_resources().get(tier, 0.0),
                               fix=f"run on a cluster with {tier} nodes (`dynray cluster up --local`), or pass --tier / --cpus-per-client that fit it") from None
        torch.manual_seed(cfg.seed)
        server = Server(build(model), cfg)
        weights = server.weights({i: len(s) for i, s in enumerate(shards)})
        records: list[RoundRecord] = []
        for r in range(cfg.rounds):
            rec = _round(server, actors, r, weights, cfg, test, drop if drop and drop.round == r else None, round_timeout_s)
            records.append(rec)
            if on_round is not None:
                on_round(rec)
        return FedRun(server.model.eval(), records, label_histogram(labels, shards, int(labels.max()) + 1), placement)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


def _reachable(actors: list, r: int, wait_s: float) -> list[int]:
    """The clients that answer now; one that is restarting (a device rebooting) gets ``wait_s``."""
    deadline = time.monotonic() + wait_s
    pending, ok = set(range(len(actors))), []
    while pending:
        for i in sorted(pending):
            try:
                ray.get(actors[i].placement.remote(), timeout=max(0.1, deadline - time.monotonic()))
                ok.append(i)
                pending.discard(i)
            except ray.exceptions.ActorUnavailableError:
                pass  # restarting: ask again until the deadline
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pending.discard(i)
        if pending and time.monotonic() >= deadline:
            break
        if pending:
            time.sleep(0.2)
    if len(ok) < len(actors):
        log.warning("round %d: client(s) %s unreachable; they sit this round out", r, sorted(set(range(len(actors))) - set(ok)))
    return sorted(ok)


def _round(server: Server, actors: list, r: int, weights: dict[int, float], cfg: FedConfig, test: Split | None, drop: DropPlan | None, timeout: float) -> RoundRecord:
    t0 = time.perf_counter()
    payload, digest = server.broadcast()
    ref = ray.put(payload)
    peers, bytes_keys = None, 0
    alive = _reachable(actors, r, min(timeout, 60.0))
    if cfg.secure_agg:
        keys = {}
        for i in alive:
            try:
                keys[i] = _get(actors[i].public_key.remote(r), timeout)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                log.warning("round %d: client %d gave no key (%s); it sits this round out", r, i, repr(e)[:300])
        peers, alive = keys, sorted(keys)
        bytes_keys = sum(len(k) for k in keys.values()) * (1 + max(0, len(keys) - 1))  # sent once, relayed to every other client
    futures = {actors[i].train_round.remote(r, ref, digest, weights[i], peers): i for i in alive}
    if drop is not None:
        time.sleep(drop.after_s)
        log.warning("round %d: killing client %d's actor while it trains (drop-out test)", r, drop.client)
        ray.kill(actors[drop.client], no_restart=False)
    ready, late = ray.wait(list(futures), num_returns=len(futures), timeout=timeout)
    updates: dict[int, ClientUpdate] = {}
    for f in ready:
        try:
            u = ray.get(f)
            updates[u.client] = u
        except ray.exceptions.RayActorError:
            pass  # died mid-round: dropped
        except ray.exceptions.RayTaskError as e:  # the client's round failed (e.g. a weights checksum): dropped, not the run
            log.warning("round %d: client %d failed its round: %s", r, futures[f], str(e.cause if e.cause is not None else e)[:300])
    for f in late:
        ray.cancel(f, force=True)
    dropped = sorted(set(alive) - set(updates))
    if dropped:
        log.warning("round %d: client(s) %s dropped out; averaging the %d update(s) that arrived", r, dropped, len(updates))
    bytes_up = sum(len(u.payload) for u in updates.values())
    bytes_down = sum(u.bytes_received for u in updates.values())
    skipped = False
    try:
        if not updates:
            raise IntegrityError("no update arrived", got={"dropped": dropped}, fix="check the client actors' logs")
        if cfg.secure_agg:
            fixes = [_get(actors[i].correction.remote(r, dropped), timeout) for i in updates] if dropped else []
            bytes_up += sum(len(f) for f in fixes)
            delta = server.aggregate_masked({i: u.payload for i, u in updates.items()}, fixes, weights)
        else:
            delta = server.aggregate({i: u.payload for i, u in updates.items()}, weights)
        server.apply(delta, first_round=r == 0)
    except (DynrayError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:  # a failed round keeps the global model
        skipped = True
        log.warning("round %d skipped, global model kept: %s", r, str(e)[:200])
    acc = full_accuracy(server.model, test) if test is not None else None
    rec = RoundRecord(r, sorted(updates), dropped, bytes_up, bytes_down, bytes_keys, acc, skipped, time.perf_counter() - t0)
    log.info("round %d/%d: %d update(s)%s, %.1f kB up, %.1f kB down, test accuracy %s [%.1fs]", r + 1, cfg.rounds, len(updates),
             f", dropped {dropped}" if dropped else "", bytes_up / 1024, bytes_down / 1024, f"{acc:.4f}" if acc is not None else "-", rec.seconds)
    return rec
