"""Ray job: train the PPO router of a registered model with RLlib and register the export.

    python -m jobs.train_router --model production --minutes 4
    dynray submit train_router -- --model production

Steps: cache the model's exit outputs (train, val, test) if missing, train PPO on the
routing environment (env runners are Ray actors), export the actor network to plain torch
and register it as ``<model>-router`` tied to the model version.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.routing.cache import SPLITS, ensure_exit_caches, load_records
from dynray.routing.costs import RouteCosts
from dynray.routing.env import RouterEnvConfig
from dynray.routing.policy import save_policy
from dynray.routing.ppo import PPOTrainConfig, train_ppo
from dynray.store import load_model
from jobs._ray import connect, job_registry

__all__ = ["Config", "Result", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Train a model's PPO router and register it."""

    model: str | None = None
    """Model ref (default: production, else the newest)."""
    train_splits: str = "train+val"
    """Splits whose exit outputs PPO replays, joined by +."""
    ppo: Annotated[PPOTrainConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=PPOTrainConfig)
    """PPO hyperparameters and budget."""

    def __post_init__(self) -> None:
        bad = [s for s in self.splits() if s not in SPLITS]
        if bad or not self.splits():
            raise ConfigError("unknown split in --train-splits", got=self.train_splits, fix=f"join splits of {', '.join(SPLITS)} with +, e.g. train+val")

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.train_splits.split("+") if s)


@dataclass(frozen=True)
class Result:
    router: str
    """The registered router ref."""
    model: str
    """The model version it routes."""
    train_minutes: float
    iterations: int
    final_return: float | None
    """Last mean episode reward (shaped)."""

    def summary(self) -> str:
        ret = "n/a" if self.final_return is None else f"{self.final_return:.4f}"
        return f"registered {self.router} for {self.model}: {self.iterations} PPO iterations in {self.train_minutes:.1f} min (last mean episode reward, shaped: {ret})"


def run(cfg: Config) -> Result:
    registry = job_registry()
    stored = load_model(registry, cfg.model)
    ref = stored.info.ref
    ensure_exit_caches(registry, ref)
    records = load_records(registry, ref, cfg.splits())
    costs = RouteCosts.for_model(stored.model)
    env_cfg = RouterEnvConfig(costs=costs)
    connect(num_cpus=2, log_to_driver=False)
    print(f"training the PPO router of {ref} on {records.labels.shape[0]} samples ({cfg.train_splits}), budget {cfg.ppo.minutes} min", flush=True)

    def progress(row: dict) -> None:
        print(f"  iteration {row['iteration']:>3}  mean episode reward {row['episode_return_mean']:.4f}  env steps {row['env_steps']:>7}  {row['seconds']:.0f}s", flush=True)

    t0 = time.perf_counter()
    res = train_ppo(cfg.ppo, records, env_cfg, progress=progress)
    minutes = (time.perf_counter() - t0) / 60
    meta = {
        "dataset": stored.dataset,
        "costs": costs.to_dict(),
        "env": {"weights": dataclasses.asdict(env_cfg.weights), "load": dataclasses.asdict(env_cfg.load), "train_splits": cfg.train_splits},
        "ppo": dataclasses.asdict(cfg.ppo),
        "history": res.history,
        "train_minutes": minutes,
        "iterations": res.iterations,
    }
    info = save_policy(registry, stored.info, res.policy, meta)
    return Result(router=info.ref, model=ref, train_minutes=minutes, iterations=res.iterations,
                  final_return=res.history[-1]["episode_return_mean"] if res.history else None)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.train_router") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.train_router"))
