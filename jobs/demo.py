"""The main job: train -> calibrate -> promote -> bench -> PPO router -> serve traffic, on an embedded local Ray.

    python -m jobs.demo        (what `make demo` and `dynray demo` run)

Each step is a job of its own, run here with a config composed from this one by
``dataclasses.replace`` (the same jobs `dynray submit` sends to a cluster).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace

from dynray.flags import guarded, parse, setup_logging
from dynray.routing.ppo import PPOTrainConfig
from dynray.training import TrainConfig
from jobs import bench, calibrate, http_traffic, train, train_router

__all__ = ["Config", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Train, calibrate, benchmark, train the router and serve, on mnist-5k by default."""

    dataset: str = "mnist-5k"
    """Dataset."""
    epochs: int = TrainConfig.epochs
    """Training epochs."""
    workers: int = TrainConfig.workers
    """Ray Train workers."""
    max_drop: float = 0.002
    """Calibration target: accuracy drop vs the last exit on val."""
    json: str = "out/bench.json"
    """Bench JSON output."""
    router_minutes: float = PPOTrainConfig.minutes
    """PPO router training budget in minutes."""
    router_iterations: int = PPOTrainConfig.iterations
    """Most PPO iterations."""
    serve: bool = True
    """Step 5: deploy the Serve graph and send the test split over HTTP (--no-serve skips it)."""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _indent(text: str, by: str = "      ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def run(cfg: Config) -> int:
    t0 = time.perf_counter()
    steps = 5 if cfg.serve else 4
    tcfg = replace(train.Config(), dataset=cfg.dataset, epochs=cfg.epochs, workers=cfg.workers)
    tcfg.train_config()  # bad input fails before the first step
    _say(f"[1/{steps}] training a DynamicNet on {cfg.dataset} with Ray Train ({cfg.workers} workers, {cfg.epochs} epochs)")
    r = train.run(tcfg)
    _say(_indent(r.summary()))
    _say(f"[2/{steps}] calibrating thresholds on val (max accuracy drop {cfg.max_drop}) and promoting to production")
    c = calibrate.run(calibrate.Config(model=r.model, max_drop=cfg.max_drop, promote="production"))
    cal = c.calibration
    _say(f"      {c.model}: val accuracy {cal['val_accuracy']:.4f} (last exit {cal['val_reference_accuracy']:.4f}), {cal['val_macs_saving']:.2f}x fewer MACs")
    _say(f"[3/{steps}] benchmarking {c.model} on the {cfg.dataset} test split -> {cfg.json}")
    _say(bench.run(bench.CoreConfig(model=c.model, dataset=cfg.dataset, json=cfg.json)).summary().split("\n", 1)[1])
    _say(f"[4/{steps}] training the PPO router of {c.model} with RLlib (budget {cfg.router_minutes:g} min, at most {cfg.router_iterations} iterations)")
    ppo = replace(PPOTrainConfig(), minutes=cfg.router_minutes, iterations=cfg.router_iterations)
    rt = train_router.run(train_router.Config(model=c.model, ppo=ppo))
    _say(f"      registered {rt.router}: {rt.iterations} iterations in {rt.train_minutes:.1f} min")
    if cfg.serve:
        _say(f"[5/5] deploying the edge/cloud Serve graph with {c.model} and the hybrid router, sending the {cfg.dataset} test split over HTTP")
        t = http_traffic.run(http_traffic.Config(model=c.model, dataset=cfg.dataset, split="test", concurrency=8, router="hybrid"))
        _say(_indent(t.summary()))
    _say(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.demo") -> int:
    return run(parse(Config, argv, prog=prog, description=__doc__))


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.demo"))
