"""The AutoML pipeline's plan and record: how a budget is split across its steps, what each
step left behind, and where the time went. ``jobs/automl.py`` runs the steps.

Steps, in order: ``nas`` (Ray Tune search), ``train`` (the chosen architecture from scratch
with Ray Train), ``calibrate`` (thresholds on val, with the drift reference), ``router``
(RLlib PPO), ``register`` (promote to a stage), ``deploy`` (Ray Serve) and ``check`` (the
test split sent through the deployed service over HTTP).

**Budget.** ``calibrate``, ``register``, ``deploy`` and ``check`` get fixed reserves (they
cost about the same at any budget); the rest is split by shares between the three learned
steps. A budget too small to give each learned step its floor is refused, naming the least
budget that works. A resumed run re-plans the steps still to do from the budget left.

**Record.** :class:`RunState` is saved as JSON after every step (atomically), so a run that
was interrupted can be resumed: finished steps are skipped, the interrupted one starts over.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynray.errors import ConfigError
from dynray.fileio import write_atomic

__all__ = ["STEPS", "LEARNED", "RESERVE_MIN", "FLOOR_MIN", "SHARES", "StepBudget", "plan_budget", "minimum_budget", "StepRecord", "RunState",
           "pick_architecture", "time_table", "offline_accuracy"]

STEPS: tuple[str, ...] = ("nas", "train", "calibrate", "router", "register", "deploy", "check")
LEARNED: tuple[str, ...] = ("nas", "train", "router")
RESERVE_MIN: dict[str, float] = {"calibrate": 0.25, "register": 0.05, "deploy": 1.0, "check": 0.5}
"""Fixed minutes kept for the steps whose cost does not scale with the budget (measured here:
calibration ~10 s, `serve up` with its Ray head 40-60 s, the test split over HTTP ~15 s)."""
FLOOR_MIN: dict[str, float] = {"nas": 1.0, "train": 1.0, "router": 0.75}
"""Least minutes a learned step can use: NAS one trial plus Tune's start; Ray Train's start
(~20 s) plus one epoch; RLlib's build (~7 s) plus a few PPO iterations and the export."""
SHARES: dict[str, float] = {"nas": 0.45, "train": 0.30, "router": 0.25}
"""Default split of the learned steps' minutes."""


@dataclass(frozen=True)
class StepBudget:
    step: str
    minutes: float


def minimum_budget(shares: dict[str, float] = SHARES, todo: tuple[str, ...] = STEPS) -> float:
    """The least total minutes at which every step in ``todo`` gets its floor (rounded up to 0.1)."""
    fixed = sum(RESERVE_MIN[s] for s in todo if s in RESERVE_MIN)
    learned = [s for s in todo if s in LEARNED]
    total_share = sum(shares[s] for s in learned)
    need = max((FLOOR_MIN[s] * total_share / shares[s] for s in learned), default=0.0)
    return math.ceil((fixed + need) * 10 - 1e-9) / 10


def plan_budget(minutes: float, *, shares: dict[str, float] = SHARES, todo: tuple[str, ...] = STEPS) -> dict[str, float]:
    """Minutes per step still to do; refuses a budget below :func:`minimum_budget`."""
    if set(shares) != set(LEARNED) or any(v <= 0 for v in shares.values()):
        raise ConfigError("shares must give each learned step a positive share", got=shares, fix=f"one share each for {', '.join(LEARNED)}")
    least = minimum_budget(shares, todo)
    if minutes < least:
        floors = ", ".join(f"{s} {FLOOR_MIN.get(s, RESERVE_MIN.get(s, 0)):g}" for s in todo)
        raise ConfigError(f"a {minutes:g}-minute budget is too small for even one NAS trial and the steps after it", got=minutes,
                          fix=f"give --budget-minutes {least:g} or more (each step's least minutes: {floors})")
    fixed = sum(RESERVE_MIN[s] for s in todo if s in RESERVE_MIN)
    learned = [s for s in todo if s in LEARNED]
    total_share = sum(shares[s] for s in learned)
    out = {s: RESERVE_MIN[s] for s in todo if s in RESERVE_MIN}
    for s in learned:
        out[s] = (minutes - fixed) * shares[s] / total_share
    return {s: round(out[s], 3) for s in todo}


@dataclass
class StepRecord:
    step: str
    budget_min: float
    seconds: float | None = None
    """Wall time the step took (None: not finished)."""
    result: dict = field(default_factory=dict)
    """What the step produced (refs, numbers), as JSON."""


@dataclass
class RunState:
    """One AutoML run's record, saved as ``<dir>/state.json`` after each step."""

    name: str
    dataset: str
    budget_min: float
    created: float
    steps: dict[str, StepRecord] = field(default_factory=dict)
    interruptions: int = 0
    """Times the run was resumed after stopping before its end."""
    wall_s: float = 0.0
    """Wall time of every invocation of the run, summed."""

    @property
    def done(self) -> list[str]:
        return [s for s in STEPS if s in self.steps and self.steps[s].seconds is not None]

    @property
    def todo(self) -> tuple[str, ...]:
        return tuple(s for s in STEPS if s not in self.done)

    def spent_min(self) -> float:
        return sum(r.seconds or 0.0 for r in self.steps.values()) / 60

    def result(self, step: str) -> dict:
        r = self.steps.get(step)
        if r is None or r.seconds is None:
            raise ConfigError(f"the {step} step has not finished in this run", got=self.done, fix="resume the run (--resume) to finish it")
        return r.result

    def finish(self, step: str, budget_min: float, seconds: float, result: dict) -> None:
        self.steps[step] = StepRecord(step, budget_min, seconds, result)

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), json.dumps(asdict(self), indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> RunState:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
            steps = {k: StepRecord(**v) for k, v in d.pop("steps").items()}
            return cls(**d, steps=steps)
        except FileNotFoundError:
            raise ConfigError("no AutoML run to resume here", got=str(p), fix="start one without --resume (or pass the --name it ran under)") from None
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ConfigError("the AutoML run record is damaged", got=f"{p}: {e}", fix="start a new run under another --name") from None

    @classmethod
    def new(cls, name: str, dataset: str, budget_min: float) -> RunState:
        return cls(name=name, dataset=dataset, budget_min=budget_min, created=time.time())


def offline_accuracy(registry, ref: str, dataset: str, *, limit: int | None = None) -> dict:
    """A registered model's adaptive accuracy on the test split, in process (its own stop rule)."""
    import torch

    from dynray.data import load_dataset
    from dynray.store import load_model

    sm = load_model(registry, ref)
    test = load_dataset(dataset, "test")
    n = len(test) if limit is None else min(limit, len(test))
    with torch.no_grad():
        pred = torch.cat([sm.model.forward_exits(test.images[i : min(i + 512, n)], sm.rule).logits.argmax(1) for i in range(0, n, 512)])
    return {"model": sm.info.ref, "accuracy": float((pred == test.labels[:n]).float().mean()), "n": n}


def pick_architecture(front: list[dict], *, tolerance: float = 0.005) -> dict:
    """The cheapest front member whose val accuracy is within ``tolerance`` of the best one's.

    ``front``: ``{"ref", "accuracy", "macs", ...}`` rows (the registered front members)."""
    if not front:
        raise ConfigError("the search registered no architecture", fix="give the NAS step more minutes (a larger --budget-minutes), or check its trials' errors")
    best = max(r["accuracy"] for r in front)
    return min((r for r in front if r["accuracy"] >= best - tolerance), key=lambda r: (r["macs"], -r["accuracy"]))


def time_table(state: RunState) -> str:
    """Where the time went: budget and time used per step, and the total."""
    rows = [f"  {'step':<10} {'budget':>8} {'used':>8}"]
    for s in STEPS:
        r = state.steps.get(s)
        if r is None:
            continue
        used = "-" if r.seconds is None else f"{r.seconds / 60:.2f}"
        rows.append(f"  {s:<10} {r.budget_min:>8.2f} {used:>8}")
    total = state.spent_min()
    rows.append(f"  {'steps':<10} {state.budget_min:>8.2f} {total:>8.2f}")
    rows.append(f"  {'wall':<10} {'':>8} {state.wall_s / 60:>8.2f}  ({100 * state.wall_s / 60 / state.budget_min:.0f}% of the budget: every invocation, steps and the bookkeeping between them)")
    return "\n".join(rows)
