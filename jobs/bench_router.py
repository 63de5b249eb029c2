"""``dynray bench router``: the router section of the bench JSON (see dynray.bench.router).

Uses the PPO router registered for the model; trains one first (``jobs.train_router``) when
there is none, so it works on its own after ``make demo``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from dynray.bench import merge_section
from dynray.errors import ConfigError
from dynray.registry import ModelRegistry
from dynray.bench.router import RouterBenchConfig, bench_router, plot_curves
from dynray.routing.cache import load_exit_cache
from dynray.routing.costs import RouteCosts
from dynray.routing.policy import find_policy, load_policy
from dynray.routing.ppo import PPOTrainConfig
from dynray.store import load_model

log = logging.getLogger(__name__)


def add_bench_router_args(p) -> None:
    p.add_argument("--router", default=None, help="router section: router ref (default: the newest registered for the model)")
    p.add_argument("--router-minutes", type=float, default=PPOTrainConfig().minutes, help="router section: PPO budget if a router must be trained first (default: %(default)s)")


def run(a: argparse.Namespace) -> dict:
    from jobs import train_router

    registry = ModelRegistry()
    stored = load_model(registry, a.model)
    if a.dataset and a.dataset != stored.dataset:
        raise ConfigError("the router bench replays the model's own dataset", got=a.dataset, fix=f"omit --dataset or use {stored.dataset}")
    if stored.rule is None:
        raise ConfigError(f"{stored.info.ref} has no thresholds to compare against", fix=f"dynray calibrate --model {stored.info.ref} --max-drop 0.002")
    router = registry.resolve(a.router) if getattr(a, "router", None) else find_policy(registry, stored.info)
    if router is None:
        print(f"no router registered for {stored.info.ref}: training one first (dynray router train --model {stored.info.ref})", flush=True)
        d = PPOTrainConfig()
        train_router.run(SimpleNamespace(model=stored.info.ref, minutes=getattr(a, "router_minutes", d.minutes), iterations=d.iterations, batch_size=4000, env_runners=1, train_splits="train+val", seed=0))
        router = find_policy(registry, stored.info)
    train_router.ensure_caches(registry, stored.info.ref)
    sp = load_policy(registry, router.ref, stored.info)
    _, val = load_exit_cache(registry, stored.info.ref, "val")
    _, test = load_exit_cache(registry, stored.info.ref, "test")
    t0 = time.perf_counter()
    section = bench_router(val, test, RouteCosts.from_dict(sp.meta["costs"]), sp.policy, stored.rule, RouterBenchConfig(), train_minutes=sp.meta.get("train_minutes"))
    section.update({"model": stored.info.ref, "router": sp.info.ref, "dataset": stored.dataset, "bench_seconds": time.perf_counter() - t0})
    plot = Path(a.plot or Path(a.json).with_name(Path(a.json).stem + "_router.png"))
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(section, plot)
    section["plot"] = str(plot)
    merge_section(a.json, "router", section)
    return section
