"""Ray job: train the PPO router of a registered model with RLlib and register the export.

    python -m jobs.train_router --model production --minutes 4
    dynray submit train_router -- --model production

Steps: cache the model's exit outputs (train, val, test) if missing, train PPO on the
routing environment replaying the train split (env runners are Ray actors), score the policy
every ``--select-every`` iterations on the val split, which PPO never replays, export the
best-scoring iterate to plain torch and register it as ``<model>-router`` tied to the model
version. The registry entry's ``selection`` records the chosen iteration and the val score
curve (:mod:`dynray.routing.ppo`). Val is then not unseen by the router: it chose the
iterate (the hybrid's safety gate, fitted on val by ``dynray bench router``, reuses it).
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
from dynray.registry import ModelInfo
from dynray.routing.cache import SPLITS, ensure_exit_caches, load_records
from dynray.routing.costs import RouteCosts
from dynray.routing.env import RouterEnvConfig
from dynray.routing.policy import PolicyNet, save_policy
from dynray.routing.ppo import PPOTrainConfig, train_ppo
from dynray.store import load_model
from jobs._ray import connect, job_registry

__all__ = ["Config", "Result", "Trained", "train", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Train a model's PPO router and register it."""

    model: str | None = None
    """Model ref (default: production, else the newest)."""
    train_splits: str = "train"
    """Splits whose exit outputs PPO replays, joined by + (keep the select split out of them)."""
    select_split: str = "val"
    """Held-out split that picks the exported iterate (see --select-every)."""
    ppo: Annotated[PPOTrainConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=PPOTrainConfig)
    """PPO hyperparameters and budget."""

    def __post_init__(self) -> None:
        bad = [s for s in self.splits() if s not in SPLITS]
        if bad or not self.splits():
            raise ConfigError("unknown split in --train-splits", got=self.train_splits, fix=f"join splits of {', '.join(SPLITS)} with +, e.g. train")
        if self.select_split not in SPLITS:
            raise ConfigError("unknown --select-split", got=self.select_split, fix=f"one of {', '.join(SPLITS)}, e.g. val")
        if self.ppo.select_every > 0 and self.select_split in self.splits():
            raise ConfigError("the split that selects the PPO iterate must be held out from PPO's training splits", got=(self.train_splits, self.select_split),
                              fix=f"e.g. --train-splits train --select-split val, or --select-every 0 to export the last iterate of {self.train_splits}")

    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.train_splits.split("+") if s)


@dataclass(frozen=True)
class Trained:
    """A trained, exported router before it is registered."""

    policy: PolicyNet
    model: ModelInfo
    """The model version it routes."""
    meta: dict
    """What the registry entry records (costs, env, PPO config, history, selection, minutes)."""


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
    chosen_iteration: int | None = None
    """The exported iterate (None: the last, unselected)."""

    def summary(self) -> str:
        ret = "n/a" if self.final_return is None else f"{self.final_return:.4f}"
        chosen = "" if self.chosen_iteration is None else f", exported iteration {self.chosen_iteration} (best on the held-out split)"
        return f"registered {self.router} for {self.model}: {self.iterations} PPO iterations in {self.train_minutes:.1f} min (last mean episode reward, shaped: {ret}){chosen}"


def train(cfg: Config, *, registry=None) -> Trained:
    """Cache, train, select and export; nothing is registered (``run`` registers).

    ``registry``: where the model and its exit caches are (default: :func:`jobs._ray.job_registry`).
    """
    registry = registry if registry is not None else job_registry()
    stored = load_model(registry, cfg.model)
    ref = stored.info.ref
    ensure_exit_caches(registry, ref)
    records = load_records(registry, ref, cfg.splits())
    select_on = load_records(registry, ref, (cfg.select_split,)) if cfg.ppo.select_every > 0 else None
    costs = RouteCosts.for_model(stored.model)
    env_cfg = RouterEnvConfig(costs=costs)
    connect(num_cpus=2, log_to_driver=False)
    held_out = f", iterate chosen on {cfg.select_split} ({select_on.labels.shape[0]} samples) every {cfg.ppo.select_every} iterations" if select_on is not None else ""
    print(f"training the PPO router of {ref} on {records.labels.shape[0]} samples ({cfg.train_splits}){held_out}, seed {cfg.ppo.seed}, budget {cfg.ppo.minutes} min", flush=True)

    def progress(row: dict) -> None:
        val = f"  {cfg.select_split} score {row['val_score']:+.4f}" if "val_score" in row else ""
        print(f"  iteration {row['iteration']:>3}  mean episode reward {row['episode_return_mean']:.4f}  env steps {row['env_steps']:>7}  {row['seconds']:.0f}s{val}", flush=True)

    t0 = time.perf_counter()
    res = train_ppo(cfg.ppo, records, env_cfg, select_on=select_on, progress=progress)
    minutes = (time.perf_counter() - t0) / 60
    meta = {
        "dataset": stored.dataset,
        "costs": costs.to_dict(),
        "env": {"weights": dataclasses.asdict(env_cfg.weights), "load": dataclasses.asdict(env_cfg.load), "train_splits": cfg.train_splits},
        "ppo": dataclasses.asdict(cfg.ppo),
        "history": res.history,
        "train_minutes": minutes,
        "iterations": res.iterations,
        "selection": None if res.selection is None else {**res.selection.to_dict(), "split": cfg.select_split},
    }
    return Trained(policy=res.policy, model=stored.info, meta=meta)


def run(cfg: Config) -> Result:
    registry = job_registry()
    t = train(cfg, registry=registry)
    info = save_policy(registry, t.model, t.policy, t.meta)
    sel = t.meta["selection"]
    hist = t.meta["history"]
    return Result(router=info.ref, model=t.model.ref, train_minutes=t.meta["train_minutes"], iterations=t.meta["iterations"],
                  final_return=hist[-1]["episode_return_mean"] if hist else None, chosen_iteration=sel["chosen_iteration"] if sel else None)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.train_router") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.train_router"))
