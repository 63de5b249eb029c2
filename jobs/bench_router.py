"""Router benchmark: the "router" section of the bench JSON (see dynray.bench.router).

Uses the PPO router registered for the model; trains one first (``jobs.train_router``) when
there is none, so it works on its own after ``make demo``. With ``--seeds``, it also trains one
router per PPO seed through the same code as ``dynray router train`` (``jobs.train_router.train``),
without registering them, and writes ``router.seeds[]`` (one entry per seed) and
``router.seeds_summary`` (min / median / max over the seeds); the single-run fields stay those
of the registered router (with no router registered, the first seed's is registered, as
``dynray router train --seed S`` would).

    python -m jobs.bench_router --json out/bench.json
    dynray bench router --json out/bench.json
    dynray bench router --seeds 0 1 2 --json out/bench.json     # about 3 x --router-minutes more
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.router import RouterBenchConfig, bench_router, bench_seeds, plot_curves, seeds_summary, val_use
from dynray.bench.trace import LoadShift
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import ModelRegistry
from dynray.routing.cache import ensure_exit_caches, load_exit_cache
from dynray.routing.costs import RouteCosts
from dynray.routing.policy import find_policy, load_policy, save_policy
from dynray.routing.ppo import PPOTrainConfig
from dynray.store import load_model
from jobs import train_router

__all__ = ["Config", "run", "main"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """Compare the PPO and hybrid routers with re-tuned thresholds; merge the "router" section."""

    router: str | None = None
    """Router ref (default: the newest registered for the model)."""
    router_minutes: float = PPOTrainConfig.minutes
    """PPO budget in minutes of each router trained here (none registered, or one per --seeds)."""
    router_iterations: int = PPOTrainConfig.iterations
    """PPO iterations at most of each router trained here."""
    seeds: tuple[int, ...] | None = None
    """PPO seeds: train one router per seed (not registered) and report router.seeds[]; default: only the registered router."""
    shift_requests: int = LoadShift.requests
    """Requests in the load-shift trace (the val trace that picks the learned routers' operating point uses at most 2000)."""

    def __post_init__(self) -> None:
        if self.shift_requests < 100:
            raise ConfigError("--shift-requests must be at least 100 (the slow window is 40% of the trace)", got=self.shift_requests, fix=f"e.g. --shift-requests {LoadShift.requests}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds)):
            raise ConfigError("--seeds must list distinct seeds >= 0", got=self.seeds, fix="e.g. --seeds 0 1 2")
        if self.router_minutes <= 0 or self.router_iterations < 1:
            raise ConfigError("--router-minutes must be > 0 and --router-iterations >= 1", got=(self.router_minutes, self.router_iterations), fix="e.g. --router-minutes 4.5 --router-iterations 75")

    def ppo(self, seed: int) -> PPOTrainConfig:
        """The PPO configuration of a router trained here."""
        return replace(PPOTrainConfig(), minutes=self.router_minutes, iterations=self.router_iterations, seed=seed)


def run(cfg: Config) -> BenchResult:
    check_bench_file(cfg.json)
    registry = ModelRegistry()
    stored = load_model(registry, cfg.model)
    if cfg.dataset and cfg.dataset != stored.dataset:
        raise ConfigError("the router bench replays the model's own dataset", got=cfg.dataset, fix=f"omit --dataset or use {stored.dataset}")
    if stored.rule is None:
        raise ConfigError(f"{stored.info.ref} has no thresholds to compare against", fix=f"dynray calibrate --model {stored.info.ref} --max-drop 0.002")
    router = registry.resolve(cfg.router) if cfg.router else find_policy(registry, stored.info)
    bench_cfg = RouterBenchConfig(shift=LoadShift(requests=cfg.shift_requests))
    seeded: list[train_router.Trained] = []
    if router is None:
        print(f"no router registered for {stored.info.ref}: training one first (dynray router train --model {stored.info.ref})", flush=True)
        seed = cfg.seeds[0] if cfg.seeds else PPOTrainConfig.seed
        first = train_router.train(train_router.Config(model=stored.info.ref, ppo=cfg.ppo(seed)), registry=registry)
        router = save_policy(registry, first.model, first.policy, first.meta)
        if cfg.seeds:
            seeded.append(first)
    ensure_exit_caches(registry, stored.info.ref)
    sp = load_policy(registry, router.ref, stored.info)
    _, val = load_exit_cache(registry, stored.info.ref, "val")
    _, test = load_exit_cache(registry, stored.info.ref, "test")
    t0 = time.perf_counter()
    section = bench_router(val, test, RouteCosts.from_dict(sp.meta["costs"]), sp.policy, stored.rule, bench_cfg, train_minutes=sp.meta.get("train_minutes"))
    section.update({"model": stored.info.ref, "router": sp.info.ref, "dataset": stored.dataset, "val_use": val_use(sp.meta), "bench_seconds": time.perf_counter() - t0})
    if cfg.seeds:
        entries = []
        for seed in cfg.seeds:
            t = next((x for x in seeded if x.meta["ppo"]["seed"] == seed), None)
            if t is None:
                print(f"router bench: training the PPO router of {stored.info.ref} with seed {seed} (not registered)", flush=True)
                t = train_router.train(train_router.Config(model=stored.info.ref, ppo=cfg.ppo(seed)), registry=registry)
            entries += bench_seeds(val, test, stored.rule, [(seed, t.policy, t.meta)], bench_cfg)
        section["seeds"] = entries
        section["seeds_summary"] = seeds_summary(entries)
    plot = Path(cfg.plot or Path(cfg.json).with_name(Path(cfg.json).stem + "_router.png"))
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(section, plot)
    section["plot"] = str(plot)
    merge_section(cfg.json, "router", section)
    return BenchResult("router", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_router") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_router"))
