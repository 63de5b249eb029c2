"""Ray job: the whole pipeline in one budget: NAS -> train -> calibrate -> router -> register -> deploy -> check.

    python -m jobs.automl --dataset mnist-5k --budget-minutes 12
    dynray automl --dataset mnist-5k --budget-minutes 12 [--resume]
    dynray submit automl --address http://HEAD:8265 -- --dataset mnist-5k --budget-minutes 12

Each step is a job of its own (``jobs.nas``, ``jobs.train``, ``jobs.calibrate``,
``jobs.train_router``, ``jobs.deploy``), run here with a config composed by
``dataclasses.replace``; :mod:`dynray.automl` splits the budget and keeps the record.

1. **nas**: Ray Tune search (evolution + ASHA) for the step's minutes; registers its best
   front members;
2. **train**: the cheapest front member within 0.5 pt of the best val accuracy, trained from
   scratch with Ray Train, at its searched learning rate, for as many epochs as the step's
   minutes allow (from the search's own time per epoch of that architecture);
3. **calibrate**: thresholds on val (and the drift reference);
4. **router**: the PPO router with RLlib, in the step's minutes;
5. **register**: promote the calibrated model to ``--promote`` (staging by default);
6. **deploy**: `dynray serve up` with it (a running `serve up` service is rolled to it instead);
7. **check**: the test split through the deployed service over HTTP: its accuracy, beside the
   ``production`` model's offline accuracy on the same split.

After each step the minutes left are split again over the steps still to do, so a step that
ends early leaves its time to the later ones. Progress is printed per step; the run's record (``$DYNRAY_HOME/automl/NAME/state.json``) is
saved after each one, so ``--resume`` continues an interrupted run from the step it was in,
with the budget that is left. The service stays up: `dynray serve down` stops it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from dynray.automl import STEPS, RunState, minimum_budget, offline_accuracy, pick_architecture, plan_budget, time_table
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import default_home
from dynray.routing.ppo import PPOTrainConfig
from jobs import calibrate, deploy, nas, train, train_router
from jobs._ray import job_registry

__all__ = ["Config", "Result", "run", "main"]
log = logging.getLogger(__name__)
_TRAIN_START_S = 25.0  # Ray Train's start and the val evaluation around the epochs (measured: ~20 s)
_ROUTER_OVERHEAD_S = 20.0  # RLlib build, exit-output cache and export around the PPO iterations


@dataclass(frozen=True, kw_only=True)
class Config:
    """Search, train, calibrate, route, register and deploy a model within one time budget."""

    dataset: str = "mnist-5k"
    """Dataset."""
    budget_minutes: float = 12.0
    """Wall-clock budget of the whole run, in minutes."""
    name: str | None = None
    """Run name (its record lives in $DYNRAY_HOME/automl/NAME; default: automl-DATASET)."""
    resume: bool = False
    """Continue the run of this name from the step it stopped in, with the budget left."""
    stop_after: Literal["nas", "train", "calibrate", "router", "register", "deploy"] | None = None
    """Stop after this step, as an interruption would (--resume continues)."""
    promote: Literal["staging", "production"] = "staging"
    """Stage the calibrated model is promoted to (register step)."""
    port: int | None = None
    """HTTP port of the deployed service (default: cluster/serve.yaml's, 8000)."""
    nas_share: float = 0.45
    """Share of the learned steps' minutes for the search."""
    train_share: float = 0.30
    """Share for training the chosen architecture."""
    router_share: float = 0.25
    """Share for the PPO router."""
    nas_trials: int = 40
    """Most NAS trials (the step's minutes usually end the search first)."""
    nas_epochs: int = 8
    """Epochs of a NAS trial that ASHA never stops."""
    max_epochs: int = 30
    """Most epochs of the train step (fewer when its minutes run out)."""
    workers: int = 1
    """Ray Train workers of the train step (1: the batch size the search tuned the learning rate at)."""
    seed: int = 0
    """Seed of the search, the training run and the PPO router."""
    router_iterations: int = 10_000
    """Most PPO iterations (the router step's minutes usually end it first)."""
    check_limit: int | None = None
    """The check step sends only the first N test images (default: the whole split)."""

    def __post_init__(self) -> None:
        if self.budget_minutes <= 0:
            raise ConfigError("--budget-minutes must be positive", got=self.budget_minutes, fix=f"e.g. --budget-minutes 12 (at least {minimum_budget(self.shares()):g})")
        plan_budget(self.budget_minutes, shares=self.shares())  # a budget too small fails here, naming the minimum
        if self.nas_trials < 1 or self.nas_epochs < 1 or self.max_epochs < 1 or self.workers < 1 or self.router_iterations < 1:
            raise ConfigError("--nas-trials, --nas-epochs, --max-epochs and --workers must be >= 1", got=(self.nas_trials, self.nas_epochs, self.max_epochs, self.workers), fix="e.g. the defaults")

    def shares(self) -> dict[str, float]:
        return {"nas": self.nas_share, "train": self.train_share, "router": self.router_share}

    def run_name(self) -> str:
        return self.name or f"automl-{self.dataset}"


@dataclass(frozen=True)
class Result:
    state: RunState
    path: str
    """The run record."""
    stopped: bool = False
    """The run stopped before its end (--stop-after); --resume continues it."""
    wall_s: float = 0.0
    """The run's wall time, over every invocation."""

    def summary(self) -> str:
        s = self.state
        lines = [f"automl {s.name} on {s.dataset}: " + ("stopped after " + s.done[-1] + f"; continue with --resume --name {s.name}" if self.stopped else "done")]
        if "check" in s.done:
            c = s.result("check")
            ref = f" vs the production model's {c['default_accuracy']:.4f} offline ({c['default_model']})" if c.get("default_accuracy") is not None else ""
            lines.append(f"service at {c['url']} answered {c['answered']}/{c['requests']} test images with accuracy {c['accuracy']:.4f}{ref}")
        lines.append("where the time went (minutes):")
        lines.append(time_table(s))
        lines.append(f"wall time of the run: {s.wall_s / 60:.2f} min of {s.budget_min:g} ({100 * s.wall_s / 60 / s.budget_min:.0f}%); record: {self.path}")
        return "\n".join(lines)


def _say(msg: str) -> None:
    print(msg, flush=True)


# -- the steps: each returns its JSON result ---------------------------------------------

def _nas(cfg: Config, minutes: float, state: RunState) -> dict:
    search = replace(nas.SearchFlags(), trials=cfg.nas_trials, time_budget=max(0.5, minutes - 0.4), epochs=cfg.nas_epochs, grace=1, reduction=3,
                     register_top=3, seed=cfg.seed, out=str(_dir(cfg) / "nas"))
    res = nas.run(nas.Config(dataset=cfg.dataset, search=search))
    reg = job_registry()
    by_trial = {t.trial_id: t for t in res.trials}
    front = []
    for ref in res.registered:
        meta = reg.resolve(ref).meta
        t = by_trial.get(meta["nas"]["trial"])
        per_epoch = (t.metrics.get("time_total_s", 0.0) / max(t.epochs, 1)) if t is not None else None
        front.append({"ref": ref, "accuracy": meta["metrics"]["val_accuracy_adaptive"], "macs": meta["metrics"]["val_macs_adaptive"],
                      "describe": meta["nas"]["describe"], "lr": meta["training"]["lr"], "epoch_s": per_epoch})
    return {"trials": len(res.trials), "minutes": res.minutes, "front": front, "asha_stopped_frac": res.asha_stopped_frac}


def _train(cfg: Config, minutes: float, state: RunState) -> dict:
    pick = pick_architecture(state.result("nas")["front"])
    epoch_s = pick.get("epoch_s") or 10.0
    epochs = int(max(1, min(cfg.max_epochs, (minutes * 60 - _TRAIN_START_S) // max(epoch_s, 1e-3))))
    _say(f"      architecture {pick['ref']} ({pick['describe']}): val {pick['accuracy']:.4f} at {pick['macs']:,.0f} MACs in the search; "
         f"{epochs} epochs at lr {pick['lr']:.4g} (the search took {epoch_s:.1f} s per epoch)")
    r = train.run(train.Config(dataset=cfg.dataset, arch_from=pick["ref"], epochs=epochs, lr=pick["lr"], workers=cfg.workers, seed=cfg.seed, name=cfg.run_name()))
    return {"model": r.model, "architecture": pick, "epochs": epochs, "val_accuracy_full": r.metrics["val_accuracy_full"], "seconds": r.seconds}


def _calibrate(cfg: Config, minutes: float, state: RunState) -> dict:
    c = calibrate.run(calibrate.Config(model=state.result("train")["model"], max_drop=0.002))
    return {"model": c.model, "val_accuracy": c.calibration["val_accuracy"], "val_macs_saving": c.calibration["val_macs_saving"]}


def _router(cfg: Config, minutes: float, state: RunState) -> dict:
    ppo = replace(PPOTrainConfig(), minutes=max(0.2, minutes - _ROUTER_OVERHEAD_S / 60), iterations=cfg.router_iterations, seed=cfg.seed)
    r = train_router.run(train_router.Config(model=state.result("calibrate")["model"], ppo=ppo))
    return {"router": r.router, "iterations": r.iterations, "train_minutes": r.train_minutes}


def _register(cfg: Config, minutes: float, state: RunState) -> dict:
    reg = job_registry()
    info = reg.promote(state.result("calibrate")["model"], cfg.promote)
    return {"model": info.ref, "stage": cfg.promote}


def _deploy(cfg: Config, minutes: float, state: RunState) -> dict:
    import ray

    ref = state.result("register")["model"]
    ray.shutdown()  # the steps' Ray (embedded, or the job's connection) is not the serving head
    running = deploy.serving_state()
    if running:
        deploy.roll(deploy.Config(action="roll", model=(ref,)))
        return {"model": ref, "url": running["url"], "how": "rolled the running `dynray serve up` service to it"}
    up = deploy.up(deploy.Config(action="up", model=(ref,), port=cfg.port))
    return {"model": ref, "url": up.url, "address": up.address, "how": "dynray serve up"}


def _check(cfg: Config, minutes: float, state: RunState) -> dict:
    from dynray.bench.load import LoadConfig, run_load_sync
    from dynray.bench.serve import wire_images
    from dynray.data import load_dataset
    from dynray.security.keys import KeyStore
    from dynray.serving.payload import encode_array

    d = state.result("deploy")
    test = load_dataset(cfg.dataset, "test")
    n = len(test) if cfg.check_limit is None else min(cfg.check_limit, len(test))
    images, labels = wire_images(test)[:n], test.labels[:n].tolist()
    store = KeyStore.at_home(default_home())
    key, rec = store.create(f"{cfg.run_name()}-check", scopes=["predict"], rate_per_s=100_000, ttl_s=3600)
    try:
        bodies = [encode_array(images[i : i + 1], dtype="uint8") for i in range(n)]
        res = run_load_sync(LoadConfig(url=f"{d['url']}/v1/predict", requests=n, concurrency=8, timeout_s=30, api_key=key), lambda i: bodies[i])
    finally:
        store.revoke(rec.id)
    ok = [r for r in res.records if r.ok]
    correct = sum(r.body["predictions"][0] == labels[r.index] for r in ok)
    out = {"url": d["url"], "model": d["model"], "requests": n, "answered": len(ok), "accuracy": correct / n, "served_versions": sorted({r.body["model_version"] for r in ok})}
    reg = job_registry()
    try:
        default = reg.resolve("production")
    except Exception:  # noqa: BLE001 - no production model: nothing to compare with
        default = None
    if default is not None and default.ref != d["model"]:
        off = offline_accuracy(reg, default.ref, cfg.dataset, limit=cfg.check_limit)
        out.update(default_model=off["model"], default_accuracy=off["accuracy"])
    return out


_RUN = {"nas": _nas, "train": _train, "calibrate": _calibrate, "router": _router, "register": _register, "deploy": _deploy, "check": _check}


def _dir(cfg: Config) -> Path:
    return default_home() / "automl" / cfg.run_name()


def run(cfg: Config) -> Result:
    t_start = time.perf_counter()
    path = _dir(cfg) / "state.json"
    if cfg.resume:
        state = RunState.load(path)
        state.interruptions += 1
    else:
        if path.exists():
            prev = RunState.load(path)
            if prev.todo:
                raise ConfigError("an unfinished AutoML run of this name exists", got=f"{prev.name}: done {prev.done}", fix="continue it with --resume, or start another with --name NEW")
        state = RunState.new(cfg.run_name(), cfg.dataset, cfg.budget_minutes)
    left = state.budget_min - state.wall_s / 60
    try:
        budgets = plan_budget(left, shares=cfg.shares(), todo=state.todo)
    except ConfigError:
        if not cfg.resume:
            raise
        budgets = {s: 0.0 for s in state.todo}  # over budget already: finish the steps anyway, each at its floor
        log.warning("the run has %.2f of its %.1f minutes left: the steps still to do run at their least", left, state.budget_min)
    _say(f"automl {state.name}: {cfg.dataset}, budget {state.budget_min:g} min" + (f", resumed with {left:.2f} min left, at {state.todo[0]}" if cfg.resume else "")
         + "; per step: " + ", ".join(f"{s} {m:.2f}" for s, m in budgets.items()))
    stopped, first = False, True
    try:
        for k, step in enumerate(STEPS, 1):
            if step not in state.todo:
                continue
            if not first:  # a step that ended early leaves its minutes to the steps after it
                budgets = _replan(state, cfg, budgets)
            first = False
            minutes = budgets[step]
            _say(f"[{k}/{len(STEPS)}] {step} ({minutes:.2f} min)")
            t0 = time.perf_counter()
            result = _RUN[step](cfg, minutes, state)
            secs = time.perf_counter() - t0
            state.finish(step, minutes, secs, result)
            state.wall_s += time.perf_counter() - t_start
            t_start = time.perf_counter()
            state.save(path)
            _say(f"      {step} took {secs / 60:.2f} min of its {minutes:.2f}: " + ", ".join(f"{a}={b}" for a, b in result.items() if not isinstance(b, (list, dict)))[:300])
            if step == cfg.stop_after and state.todo:
                stopped = True
                break
    finally:  # an interrupted step's time counts too: a resumed run plans with what is really left
        state.wall_s += time.perf_counter() - t_start
        state.save(path)
    return Result(state=state, path=str(path), stopped=stopped, wall_s=state.wall_s)


def _replan(state: RunState, cfg: Config, budgets: dict[str, float]) -> dict[str, float]:
    """The minutes left, split again over the steps still to do (unchanged if none are left)."""
    left = state.budget_min - state.wall_s / 60
    try:
        return plan_budget(left, shares=cfg.shares(), todo=state.todo)
    except ConfigError:  # behind schedule: keep the plan made when there was time
        return budgets


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.automl") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.automl"))
