"""The main job: train -> calibrate -> promote -> bench -> PPO router -> serve traffic (with the operations tour) -> report, on an embedded local Ray.

    python -m jobs.demo        (what `make demo` and `dynray demo` run)

Each step is a job of its own, run here with a config composed from this one by
``dataclasses.replace`` (the same jobs `dynray submit` sends to a cluster).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from dataclasses import dataclass, replace

from dynray.bench import BenchResult
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.routing.ppo import PPOTrainConfig
from dynray.training import TrainConfig
from jobs import bench, calibrate, http_traffic, report, train, train_router

__all__ = ["Config", "Result", "run", "main"]


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
    http_limit: int | None = None
    """Step 5 sends only the first N test images (default: the whole split)."""

    def __post_init__(self) -> None:
        if self.http_limit is not None and self.http_limit < 1:
            raise ConfigError("--http-limit must be at least 1 image", got=self.http_limit, fix="e.g. --http-limit 300, or leave it out to send the whole test split")


@dataclass(frozen=True)
class Result:
    """What each step produced."""

    train: train.Result
    calibrate: calibrate.Result
    bench: BenchResult
    router: train_router.Result
    traffic: http_traffic.Result | None
    """Step 5's HTTP run (None with --no-serve)."""
    seconds: float


def _say(msg: str) -> None:
    print(msg, flush=True)


def _indent(text: str, by: str = "      ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def run(cfg: Config) -> Result:
    t0 = time.perf_counter()
    steps = 5 if cfg.serve else 4
    tcfg = replace(train.Config(), dataset=cfg.dataset, epochs=cfg.epochs, workers=cfg.workers)
    tcfg.train_config()  # bad input fails before the first step
    traffic = http_traffic.Config(dataset=cfg.dataset, split="test", concurrency=8, router="hybrid", limit=cfg.http_limit)
    _say(f"[1/{steps}] training a DynamicNet on {cfg.dataset} with Ray Train ({cfg.workers} workers, {cfg.epochs} epochs)")
    r = train.run(tcfg)
    _say(_indent(r.summary()))
    _say(f"[2/{steps}] calibrating thresholds on val (max accuracy drop {cfg.max_drop}) and promoting to production")
    c = calibrate.run(calibrate.Config(model=r.model, max_drop=cfg.max_drop, promote="production"))
    cal = c.calibration
    _say(f"      {c.model}: val accuracy {cal['val_accuracy']:.4f} (last exit {cal['val_reference_accuracy']:.4f}), {cal['val_macs_saving']:.2f}x fewer MACs")
    _say(f"[3/{steps}] benchmarking {c.model} on the {cfg.dataset} test split -> {cfg.json}")
    b = bench.run(bench.CoreConfig(model=c.model, dataset=cfg.dataset, json=cfg.json, baselines=False))
    _say(b.summary().split("\n", 1)[1])
    _say(f"[4/{steps}] training the PPO router of {c.model} with RLlib (budget {cfg.router_minutes:g} min, at most {cfg.router_iterations} iterations)")
    ppo = replace(PPOTrainConfig(), minutes=cfg.router_minutes, iterations=cfg.router_iterations)
    rt = train_router.run(train_router.Config(model=c.model, ppo=ppo))
    _say(f"      registered {rt.router}: {rt.iterations} iterations in {rt.train_minutes:.1f} min")
    t = None
    if cfg.serve:
        _say(f"[5/5] deploying the edge/cloud Serve graph with {c.model} and the hybrid router, sending the {cfg.dataset} test split over HTTP" + (f" (its first {cfg.http_limit} images)" if cfg.http_limit else "")
             + ", then the operations tour (auth, rate limit, extraction flag, cloud failover, drift alarm, metrics) and the report")
        runlog = str(Path(cfg.json).with_name("runlog.jsonl"))
        t = http_traffic.run(replace(traffic, model=c.model, metrics_file=str(Path(cfg.json).with_name("metrics.prom")), runlog=runlog))
        _say(_indent(t.summary()))
        _say(_indent(report.run(report.Config(runlog=runlog, out=str(Path(cfg.json).with_name("report")))).summary()))
    seconds = time.perf_counter() - t0
    _say(f"demo finished in {seconds:.0f}s")
    return Result(train=r, calibrate=c, bench=b, router=rt, traffic=t, seconds=seconds)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.demo") -> int:
    run(parse(Config, argv, prog=prog, description=__doc__))
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.demo"))
