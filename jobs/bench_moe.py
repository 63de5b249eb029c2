"""``dynray bench moe``: the MoE section of the bench JSON (see dynray.moe_bench).

Finds the newest registered MoE model for the dataset (``moe-DATASET``) and its dense twin
at equal active MACs (``moe-DATASET-dense``, matched by config), and trains and registers
whichever is missing with Ray Train, so it works on its own after ``make demo``. The expert
actors run on the connected Ray (one actor per expert, placed by ``--expert-resources``).

    python -m jobs.bench moe --dataset mnist-5k --json out/bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace

from dynray.bench import merge_section
from dynray.data import load_dataset
from dynray.errors import ConfigError
from dynray.models.config import config_from_dict
from dynray.moe_bench import MoEBenchConfig, expert_usage, model_quality, remote_equality, remote_latency
from dynray.pipeline import train_and_register
from dynray.registry import ModelRegistry
from dynray.store import StoredModel, load_model
from dynray.training import TrainConfig, model_config_for
from jobs._ray import connect

log = logging.getLogger(__name__)


def add_bench_moe_args(p) -> None:
    d = TrainConfig()
    p.add_argument("--moe-epochs", type=int, default=d.epochs, help="moe section: epochs for a model that must be trained first (default: %(default)s)")
    p.add_argument("--moe-workers", type=int, default=d.workers, help="moe section: Ray Train workers for such a model (default: %(default)s)")
    p.add_argument("--dense-model", default=None, help="moe section: the dense twin's ref (default: the newest moe-DATASET-dense matching the MoE model)")
    p.add_argument("--moe-latency-calls", type=int, default=MoEBenchConfig().latency_calls, help="moe section: timed calls per path and batch size (default: %(default)s)")
    p.add_argument("--expert-resources", default="{}", help='moe section: JSON resources per expert actor, e.g. \'{"cloud": 1}\' (default: none)')


def _newest_matching(registry: ModelRegistry, name: str, config: dict | None) -> str | None:
    """Newest version of ``name`` (whose config equals ``config`` when given)."""
    for info in sorted(registry.list(name), key=lambda i: i.version, reverse=True):
        if config is None or config_from_dict(info.meta.get("config", {})) == config_from_dict(config):
            return info.ref
    return None


def _train(registry: ModelRegistry, dataset: str, name: str, model_cfg, a: argparse.Namespace) -> str:
    cfg = TrainConfig(dataset=dataset, model=model_cfg, epochs=a.moe_epochs, workers=a.moe_workers)
    print(f"training {name} ({a.moe_epochs} epochs, {a.moe_workers} Ray Train workers)", flush=True)
    connect(num_cpus=max(2, cfg.workers))
    info, _ = train_and_register(cfg, registry, name=name)
    return info.ref


def _models(registry: ModelRegistry, a: argparse.Namespace) -> tuple[StoredModel, StoredModel]:
    dataset = a.dataset or "mnist-5k"
    if a.model:
        moe = load_model(registry, a.model)
        if moe.model.cfg.moe is None or moe.model.cfg.moe.num_experts < 2:
            raise ConfigError("the MoE bench needs a model with MoE stages", got=moe.info.ref, fix=f"omit --model (one is trained), or train one: dynray train --arch moe --dataset {dataset}")
        dataset = moe.dataset
    else:
        ref = _newest_matching(registry, f"moe-{dataset}", None)
        if ref is None:
            ref = _train(registry, dataset, f"moe-{dataset}", model_config_for(dataset, "moe"), a)
        moe = load_model(registry, ref)
    twin_cfg = replace(moe.model.cfg, moe=moe.model.cfg.moe.dense_equivalent())  # type: ignore[union-attr]
    if a.dense_model:
        dense = load_model(registry, a.dense_model)
        if dense.model.mac_profile.cumulative[-1] > moe.model.mac_profile.cumulative[-1]:
            raise ConfigError("the dense model spends more MACs than the MoE model", got=dense.info.ref, fix="omit --dense-model: the equal-MACs twin is found or trained")
    else:
        from dynray.models.config import config_to_dict

        ref = _newest_matching(registry, f"moe-{dataset}-dense", config_to_dict(twin_cfg))
        if ref is None:
            ref = _train(registry, dataset, f"moe-{dataset}-dense", twin_cfg, a)
        dense = load_model(registry, ref)
    return moe, dense


def run(a: argparse.Namespace) -> dict:
    from actors.expert import RemoteExperts, spawn_expert_actors

    registry = ModelRegistry()
    moe, dense = _models(registry, a)
    test = load_dataset(moe.dataset, "test")
    cfg = MoEBenchConfig(latency_calls=a.moe_latency_calls)
    t0 = time.perf_counter()
    q_moe, q_dense = model_quality(moe.model, test, cfg), model_quality(dense.model, test, cfg)
    usage = expert_usage(moe.model, test, cfg)
    connect(num_cpus=2)
    version, hosts = spawn_expert_actors(moe.info.ref, home=str(registry.home), resources=json.loads(a.expert_resources))
    remote = load_model(registry, moe.info.ref).model
    runner = RemoteExperts(version, hosts, timeout_s=30.0)
    remote.set_expert_runner(runner)
    eq = remote_equality(moe.model, remote, test, cfg)
    lat = remote_latency(moe.model, runner, test, cfg)
    section = {
        "dataset": moe.dataset,
        "n_test": len(test),
        "model": moe.info.ref,
        "dense_model": dense.info.ref,
        "moe_config": json.loads(json.dumps(moe.info.meta["config"]["moe"])),
        "accuracy_moe": q_moe["accuracy"],
        "accuracy_dense": q_dense["accuracy"],
        "active_macs_moe": q_moe["active_macs"],
        "macs_dense": q_dense["active_macs"],
        "adaptive": {"moe": q_moe["adaptive"], "dense": q_dense["adaptive"]},
        "expert_share_min": usage["expert_share_min"],
        "expert_share_min_vs_uniform": usage["expert_share_min_vs_uniform"],
        "expert_share": usage["expert_share"],
        "dropped_frac": usage["dropped_frac"],
        "usage_batch_size": usage["batch_size"],
        "actor_max_abs_diff": eq["max_abs_diff"],
        "actor_rerouted": eq["rerouted"],
        "remote_overhead_ms": lat["b1"]["overhead_p50_ms"],
        "remote_latency_ms": lat,
        "bench_seconds": time.perf_counter() - t0,
    }
    merge_section(a.json, "moe", section)
    return section


def main(argv: list[str] | None = None) -> dict:
    from jobs.bench import add_bench_args

    p = argparse.ArgumentParser(prog="python -m jobs.bench_moe", description=__doc__.splitlines()[0])
    add_bench_args(p)
    return run(p.parse_args(["moe", *(argv or [])]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(), indent=2))
