"""Router benchmark: the "router" section of the bench JSON (see dynray.bench.router).

Uses the PPO router registered for the model; trains one first (``jobs.train_router``) when
there is none, so it works on its own after ``make demo``.

    python -m jobs.bench_router --json out/bench.json
    dynray bench router --json out/bench.json
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.router import RouterBenchConfig, bench_router, plot_curves
from dynray.bench.trace import LoadShift
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import ModelRegistry
from dynray.routing.cache import ensure_exit_caches, load_exit_cache
from dynray.routing.costs import RouteCosts
from dynray.routing.policy import find_policy, load_policy
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
    """PPO budget in minutes if a router must be trained first."""
    shift_requests: int = LoadShift.requests
    """Requests in the load-shift trace (the val trace that picks the learned routers' operating point uses at most 2000)."""

    def __post_init__(self) -> None:
        if self.shift_requests < 100:
            raise ConfigError("--shift-requests must be at least 100 (the slow window is 40% of the trace)", got=self.shift_requests, fix=f"e.g. --shift-requests {LoadShift.requests}")


def run(cfg: Config) -> BenchResult:
    check_bench_file(cfg.json)
    registry = ModelRegistry()
    stored = load_model(registry, cfg.model)
    if cfg.dataset and cfg.dataset != stored.dataset:
        raise ConfigError("the router bench replays the model's own dataset", got=cfg.dataset, fix=f"omit --dataset or use {stored.dataset}")
    if stored.rule is None:
        raise ConfigError(f"{stored.info.ref} has no thresholds to compare against", fix=f"dynray calibrate --model {stored.info.ref} --max-drop 0.002")
    router = registry.resolve(cfg.router) if cfg.router else find_policy(registry, stored.info)
    if router is None:
        print(f"no router registered for {stored.info.ref}: training one first (dynray router train --model {stored.info.ref})", flush=True)
        ppo = replace(PPOTrainConfig(), minutes=cfg.router_minutes)
        train_router.run(train_router.Config(model=stored.info.ref, ppo=ppo))
        router = find_policy(registry, stored.info)
    ensure_exit_caches(registry, stored.info.ref)
    sp = load_policy(registry, router.ref, stored.info)
    _, val = load_exit_cache(registry, stored.info.ref, "val")
    _, test = load_exit_cache(registry, stored.info.ref, "test")
    t0 = time.perf_counter()
    section = bench_router(val, test, RouteCosts.from_dict(sp.meta["costs"]), sp.policy, stored.rule, RouterBenchConfig(shift=LoadShift(requests=cfg.shift_requests)), train_minutes=sp.meta.get("train_minutes"))
    section.update({"model": stored.info.ref, "router": sp.info.ref, "dataset": stored.dataset, "bench_seconds": time.perf_counter() - t0})
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
