"""MoE benchmark: the "moe" section of the bench JSON (see dynray.bench.moe).

For each of ``--moe-seeds`` training seeds it finds the newest registered MoE model for the
dataset (``moe-DATASET``) and its dense twin at equal active MACs (``moe-DATASET-dense``),
matched by config and seed, and trains and registers whichever is missing with Ray Train,
so it works on its own after ``make demo``. Accuracies are averaged over the seed pairs and
reported per pair. The expert actors run on the connected Ray (one actor per expert, placed
by ``--expert-resources``).

    python -m jobs.bench_moe --dataset mnist-5k --json out/bench.json
    dynray bench moe --json out/bench.json
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, replace

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.moe import MoEBenchConfig, expert_usage, model_quality, remote_equality, remote_latency
from dynray.data import load_dataset
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.models.config import DynamicNetConfig, config_from_dict, config_to_dict
from dynray.models.defaults import model_config_for
from dynray.pipeline import train_and_register
from dynray.registry import ModelInfo, ModelRegistry
from dynray.store import StoredModel, load_model
from dynray.training import TrainConfig
from jobs._ray import connect

__all__ = ["Config", "run", "main"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """Compare MoE models with their dense twins at equal active MACs; merge the "moe" section."""

    moe_epochs: int = TrainConfig.epochs
    """Epochs for a model that must be trained first."""
    moe_workers: int = TrainConfig.workers
    """Ray Train workers for such a model."""
    dense_model: str | None = None
    """The dense twin's ref (default: the newest moe-DATASET-dense matching the MoE model)."""
    moe_seeds: int = 3
    """MoE/dense pairs (training seeds 0..N-1) averaged, since one 1,000-sample test split moves by ~0.3 pt between seeds."""
    moe_latency_calls: int = MoEBenchConfig.latency_calls
    """Timed calls per path and batch size."""
    expert_resources: str = "{}"
    """JSON resources per expert actor, e.g. '{"cloud": 1}'."""

    def __post_init__(self) -> None:
        self.expert_resources_dict()
        if self.moe_seeds < 1 or self.moe_epochs < 1 or self.moe_workers < 1 or self.moe_latency_calls < 1:
            raise ConfigError("--moe-seeds, --moe-epochs, --moe-workers and --moe-latency-calls must be >= 1",
                              got=(self.moe_seeds, self.moe_epochs, self.moe_workers, self.moe_latency_calls), fix="e.g. --moe-seeds 3")

    def expert_resources_dict(self) -> dict[str, float]:
        try:
            res = json.loads(self.expert_resources)
        except json.JSONDecodeError:
            res = None
        if not isinstance(res, dict) or not all(isinstance(v, (int, float)) for v in res.values()):
            raise ConfigError("--expert-resources must be a JSON object of resource amounts", got=self.expert_resources, fix='e.g. --expert-resources \'{"cloud": 1}\'')
        return res


def _seed(info: ModelInfo) -> int | None:
    return (info.meta.get("training") or {}).get("seed")


def _find_or_train(registry: ModelRegistry, name: str, model_cfg: DynamicNetConfig, seed: int, cfg: Config) -> StoredModel:
    """The newest version of ``name`` with this config and training seed; trained if none."""
    want = config_from_dict(config_to_dict(model_cfg))
    for info in sorted(registry.list(name), key=lambda i: i.version, reverse=True):
        if _seed(info) == seed and config_from_dict(info.meta.get("config", {})) == want:
            return load_model(registry, info.ref)
    tcfg = TrainConfig(dataset=cfg.dataset or "mnist-5k", model=model_cfg, epochs=cfg.moe_epochs, workers=cfg.moe_workers, seed=seed)
    print(f"training {name} (seed {seed}, {cfg.moe_epochs} epochs, {cfg.moe_workers} Ray Train workers)", flush=True)
    connect(num_cpus=max(2, tcfg.workers))
    info, _ = train_and_register(tcfg, registry, name=name)
    return load_model(registry, info.ref)


def _pairs(registry: ModelRegistry, cfg: Config) -> list[tuple[StoredModel, StoredModel]]:
    """(MoE model, dense twin) per seed: ``--model`` gives one pair, else ``--moe-seeds`` pairs."""
    dataset = cfg.dataset or "mnist-5k"
    if cfg.model:
        moe = load_model(registry, cfg.model)
        if moe.model.cfg.moe is None or moe.model.cfg.moe.num_experts < 2:
            raise ConfigError("the MoE bench needs a model with MoE stages", got=moe.info.ref, fix=f"omit --model (one is trained), or train one: dynray train --arch moe --dataset {dataset}")
        models = [moe]
    else:
        models = [_find_or_train(registry, f"moe-{dataset}", model_config_for(dataset, "moe"), s, cfg) for s in range(cfg.moe_seeds)]
    pairs = []
    for moe in models:
        twin_cfg = replace(moe.model.cfg, moe=moe.model.cfg.moe.dense_equivalent())  # type: ignore[union-attr]
        if cfg.dense_model:
            dense = load_model(registry, cfg.dense_model)
            if dense.model.mac_profile.cumulative[-1] > moe.model.mac_profile.cumulative[-1]:
                raise ConfigError("the dense model spends more MACs than the MoE model", got=dense.info.ref, fix="omit --dense-model: the equal-MACs twin is found or trained")
        else:
            dense = _find_or_train(registry, f"{moe.info.name}-dense", twin_cfg, _seed(moe.info) or 0, cfg)
        pairs.append((moe, dense))
    return pairs


def run(cfg: Config) -> BenchResult:
    from actors.expert import RemoteExperts, spawn_expert_actors

    check_bench_file(cfg.json)  # before any training or measuring
    registry = ModelRegistry()
    pairs = _pairs(registry, cfg)
    moe, dense = pairs[0]
    test = load_dataset(moe.dataset, "test")
    mcfg = MoEBenchConfig(latency_calls=cfg.moe_latency_calls)
    t0 = time.perf_counter()
    per_seed = []
    for m, d in pairs:
        qm, qd = model_quality(m.model, test, mcfg), model_quality(d.model, test, mcfg)
        per_seed.append({"model": m.info.ref, "dense_model": d.info.ref, "seed": _seed(m.info), "moe": qm, "dense": qd, "gap_pt": 100 * (qm["accuracy"] - qd["accuracy"])})
    usage = [expert_usage(m.model, test, mcfg) for m, _ in pairs]
    connect(num_cpus=2)
    version, hosts = spawn_expert_actors(moe.info.ref, home=str(registry.home), resources=cfg.expert_resources_dict())
    remote = load_model(registry, moe.info.ref).model
    runner = RemoteExperts(version, hosts, timeout_s=30.0)
    remote.set_expert_runner(runner)
    eq = remote_equality(moe.model, remote, test, mcfg)
    lat = remote_latency(moe.model, runner, test, mcfg)

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
        "usage_batch_size": mcfg.batch_size,
        "actor_max_abs_diff": eq["max_abs_diff"],
        "actor_rerouted": eq["rerouted"],
        "remote_overhead_ms": lat["b1"]["overhead_p50_ms"],
        "remote_latency_ms": lat,
        "bench_seconds": time.perf_counter() - t0,
    }
    merge_section(cfg.json, "moe", section)
    return BenchResult("moe", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_moe") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_moe"))
