"""Ray job: train the PPO router of a registered model with RLlib and register the export.

    python -m jobs.train_router --model production --minutes 4
    ray job submit --working-dir . -- python -m jobs.train_router --model production

Steps: cache the model's exit outputs (train, val, test) if missing, time its stages, train
PPO on the routing environment (env runners are Ray actors), export the actor network to
plain torch and register it as ``<model>-router`` tied to the model version.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import torch

from dynray.evaluation import ExitRecords
from dynray.registry import ModelRegistry
from dynray.routing.cache import cache_path, load_exit_cache, write_exit_cache
from dynray.routing.costs import RouteCosts
from dynray.routing.env import RouterEnvConfig
from dynray.routing.policy import save_policy
from dynray.routing.ppo import PPOTrainConfig, train_ppo
from dynray.store import load_model
from jobs._ray import connect

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def add_train_router_args(p: argparse.ArgumentParser) -> None:
    d = PPOTrainConfig()
    p.add_argument("--model", default=None, help="model ref (default: production, else newest)")
    p.add_argument("--minutes", type=float, default=d.minutes, help="PPO wall-clock budget (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=d.iterations, help="most PPO iterations (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="env steps per iteration (default: %(default)s)")
    p.add_argument("--env-runners", type=int, default=d.env_runners, help="env-runner actors (default: %(default)s)")
    p.add_argument("--train-splits", default="train+val", help="splits whose exit outputs PPO replays (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)


def ensure_caches(registry: ModelRegistry, ref: str | None) -> None:
    """Cache exit outputs of every split of ``ref`` that has none yet."""
    stored = None
    for split in SPLITS:
        if not cache_path(registry.home, registry.resolve(ref), split).is_file():
            stored = stored or load_model(registry, ref)
            write_exit_cache(registry, stored, split)


def concat_records(parts: list[ExitRecords]) -> ExitRecords:
    if len(parts) == 1:
        return parts[0]
    return ExitRecords(logits=torch.cat([p.logits for p in parts], 1), complexity=torch.cat([p.complexity for p in parts]),
                       labels=torch.cat([p.labels for p in parts]), cum_macs=parts[0].cum_macs, full_macs=parts[0].full_macs)


def run(a: argparse.Namespace) -> dict:
    registry = ModelRegistry()
    stored = load_model(registry, a.model)
    ref = stored.info.ref
    ensure_caches(registry, ref)
    records = concat_records([load_exit_cache(registry, ref, s)[1] for s in a.train_splits.split("+")])
    costs = RouteCosts.for_model(stored.model)
    env_cfg = RouterEnvConfig(costs=costs)
    cfg = PPOTrainConfig(minutes=a.minutes, iterations=a.iterations, batch_size=a.batch_size, minibatch_size=min(PPOTrainConfig().minibatch_size, a.batch_size),
                         env_runners=a.env_runners, seed=a.seed)
    connect(num_cpus=2, log_to_driver=False)
    print(f"training the PPO router of {ref} on {records.labels.shape[0]} samples ({a.train_splits}), budget {cfg.minutes} min", flush=True)

    def progress(row: dict) -> None:
        print(f"  iteration {row['iteration']:>3}  mean episode reward {row['episode_return_mean']:.4f}  env steps {row['env_steps']:>7}  {row['seconds']:.0f}s", flush=True)

    t0 = time.perf_counter()
    res = train_ppo(cfg, records, env_cfg, progress=progress)
    minutes = (time.perf_counter() - t0) / 60
    meta = {
        "dataset": stored.dataset,
        "costs": costs.to_dict(),
        "env": {"weights": dataclasses.asdict(env_cfg.weights), "load": dataclasses.asdict(env_cfg.load), "train_splits": a.train_splits},
        "ppo": dataclasses.asdict(cfg),
        "history": res.history,
        "train_minutes": minutes,
        "iterations": res.iterations,
    }
    info = save_policy(registry, stored.info, res.policy, meta)
    return {"router": info.ref, "model": ref, "train_minutes": minutes, "iterations": res.iterations,
            "final_return": res.history[-1]["episode_return_mean"] if res.history else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.train_router", description=__doc__.splitlines()[0])
    add_train_router_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = main()
    print(f"registered {r['router']} for {r['model']}: {r['iterations']} PPO iterations in {r['train_minutes']:.1f} min")
