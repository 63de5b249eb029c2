"""``dynray bench moe``: the MoE section of the bench JSON (see dynray.bench.moe).

For each of ``--moe-seeds`` training seeds it finds the newest registered MoE model for the
dataset (``moe-DATASET``) and its dense twin at equal active MACs (``moe-DATASET-dense``),
matched by config and seed, and trains and registers whichever is missing with Ray Train,
so it works on its own after ``make demo``. Accuracies are averaged over the seed pairs and
reported per pair. The expert
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
from dynray.models.config import DynamicNetConfig, config_from_dict, config_to_dict
from dynray.bench.moe import MoEBenchConfig, expert_usage, model_quality, remote_equality, remote_latency
from dynray.pipeline import train_and_register
from dynray.registry import ModelInfo, ModelRegistry
from dynray.store import StoredModel, load_model
from dynray.models.defaults import model_config_for
from dynray.training import TrainConfig
from jobs._ray import connect

log = logging.getLogger(__name__)


def add_bench_moe_args(p) -> None:
    d = TrainConfig()
    p.add_argument("--moe-epochs", type=int, default=d.epochs, help="moe section: epochs for a model that must be trained first (default: %(default)s)")
    p.add_argument("--moe-workers", type=int, default=d.workers, help="moe section: Ray Train workers for such a model (default: %(default)s)")
    p.add_argument("--dense-model", default=None, help="moe section: the dense twin's ref (default: the newest moe-DATASET-dense matching the MoE model)")
    p.add_argument("--moe-seeds", type=int, default=3, help="moe section: MoE/dense pairs (training seeds 0..N-1) averaged, since one 1,000-sample test split moves by ~0.3 pt between seeds (default: %(default)s)")
    p.add_argument("--moe-latency-calls", type=int, default=MoEBenchConfig().latency_calls, help="moe section: timed calls per path and batch size (default: %(default)s)")
    p.add_argument("--expert-resources", default="{}", help='moe section: JSON resources per expert actor, e.g. \'{"cloud": 1}\' (default: none)')


def _seed(info: ModelInfo) -> int | None:
    return (info.meta.get("training") or {}).get("seed")


def _find_or_train(registry: ModelRegistry, name: str, model_cfg: DynamicNetConfig, seed: int, a: argparse.Namespace) -> StoredModel:
    """The newest version of ``name`` with this config and training seed; trained if none."""
    want = config_from_dict(config_to_dict(model_cfg))
    for info in sorted(registry.list(name), key=lambda i: i.version, reverse=True):
        if _seed(info) == seed and config_from_dict(info.meta.get("config", {})) == want:
            return load_model(registry, info.ref)
    cfg = TrainConfig(dataset=a.dataset or "mnist-5k", model=model_cfg, epochs=a.moe_epochs, workers=a.moe_workers, seed=seed)
    print(f"training {name} (seed {seed}, {a.moe_epochs} epochs, {a.moe_workers} Ray Train workers)", flush=True)
    connect(num_cpus=max(2, cfg.workers))
    info, _ = train_and_register(cfg, registry, name=name)
    return load_model(registry, info.ref)


def _pairs(registry: ModelRegistry, a: argparse.Namespace) -> list[tuple[StoredModel, StoredModel]]:
    """(MoE model, dense twin) per seed: ``--model`` gives one pair, else ``--moe-seeds`` pairs."""
    dataset = a.dataset or "mnist-5k"
    if a.model:
        moe = load_model(registry, a.model)
        if moe.model.cfg.moe is None or moe.model.cfg.moe.num_experts < 2:
            raise ConfigError("the MoE bench needs a model with MoE stages", got=moe.info.ref, fix=f"omit --model (one is trained), or train one: dynray train --arch moe --dataset {dataset}")
        models = [moe]
    else:
        models = [_find_or_train(registry, f"moe-{dataset}", model_config_for(dataset, "moe"), s, a) for s in range(a.moe_seeds)]
    pairs = []
    for moe in models:
        twin_cfg = replace(moe.model.cfg, moe=moe.model.cfg.moe.dense_equivalent())  # type: ignore[union-attr]
        if a.dense_model:
            dense = load_model(registry, a.dense_model)
            if dense.model.mac_profile.cumulative[-1] > moe.model.mac_profile.cumulative[-1]:
                raise ConfigError("the dense model spends more MACs than the MoE model", got=dense.info.ref, fix="omit --dense-model: the equal-MACs twin is found or trained")
        else:
            dense = _find_or_train(registry, f"{moe.info.name}-dense", twin_cfg, _seed(moe.info) or 0, a)
        pairs.append((moe, dense))
    return pairs


def run(a: argparse.Namespace) -> dict:
    from actors.expert import RemoteExperts, spawn_expert_actors

    registry = ModelRegistry()
    pairs = _pairs(registry, a)
    moe, dense = pairs[0]
    test = load_dataset(moe.dataset, "test")
    cfg = MoEBenchConfig(latency_calls=a.moe_latency_calls)
    t0 = time.perf_counter()
    per_seed = []
    for m, d in pairs:
        qm, qd = model_quality(m.model, test, cfg), model_quality(d.model, test, cfg)
        per_seed.append({"model": m.info.ref, "dense_model": d.info.ref, "seed": _seed(m.info), "moe": qm, "dense": qd, "gap_pt": 100 * (qm["accuracy"] - qd["accuracy"])})
    usage = [expert_usage(m.model, test, cfg) for m, _ in pairs]
    connect(num_cpus=2)
    version, hosts = spawn_expert_actors(moe.info.ref, home=str(registry.home), resources=json.loads(a.expert_resources))
    remote = load_model(registry, moe.info.ref).model
    runner = RemoteExperts(version, hosts, timeout_s=30.0)
    remote.set_expert_runner(runner)
    eq = remote_equality(moe.model, remote, test, cfg)
    lat = remote_latency(moe.model, runner, test, cfg)

    def mean(key: str, side: str) -> float:
        return sum(p[side][key] for p in per_seed) / len(per_seed)

    section = {
        "dataset": moe.dataset,
        "n_test": len(test),
        "model": moe.info.ref,
        "dense_model": dense.info.ref,
        "moe_config": moe.info.meta["config"]["moe"],
        "seeds": len(pairs),
        # mean over the seed pairs (each pair: an MoE model and its dense twin, same seed)
        "accuracy_moe": mean("accuracy", "moe"),
        "accuracy_dense": mean("accuracy", "dense"),
        "active_macs_moe": mean("active_macs", "moe"),
        "macs_dense": mean("active_macs", "dense"),
        "per_seed": per_seed,
        "expert_share_min": min(u["expert_share_min"] for u in usage),
        "expert_share_min_vs_uniform": min(u["expert_share_min_vs_uniform"] for u in usage),
        "expert_share": usage[0]["expert_share"],
        "dropped_frac": max(u["dropped_frac"] for u in usage),
        "usage_batch_size": cfg.batch_size,
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
