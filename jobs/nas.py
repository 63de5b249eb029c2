"""Ray job: neural architecture search with Ray Tune (dynray.nas).

Runs the budgeted search on the connected Ray, prints the results table, writes the table
(CSV), the Pareto front (PNG) and a JSON summary under ``--out``, and registers the best
front members as ``nas-DATASET:vN``.

    python -m jobs.nas --dataset mnist-5k --trials 30 --time-budget 15 [--searcher evolution|random|darts]
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

from dynray.nas import NASConfig, run_search
from dynray.nas.darts import DartsConfig
from dynray.bench.nas import format_table
from dynray.registry import ModelRegistry
from jobs._ray import connect

log = logging.getLogger(__name__)


def add_nas_args(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The search's arguments (``prefix`` "nas-" for the bench's argument group)."""
    d = NASConfig()
    if not prefix:
        p.add_argument("--dataset", default=d.dataset, help="dataset (default: %(default)s)")
    p.add_argument(f"--{prefix}trials", type=int, default=d.trials, help="trials in all, the reference included (default: %(default)s)")
    p.add_argument(f"--{prefix}time-budget", type=float, default=d.time_budget_min, help="wall-clock budget in minutes (default: %(default)s)")
    p.add_argument(f"--{prefix}searcher", default=d.searcher, help="random, evolution or darts (default: %(default)s)")
    p.add_argument(f"--{prefix}epochs", type=int, default=d.epochs, help="epochs of a trial that is never stopped, ASHA's max_t (default: %(default)s)")
    p.add_argument(f"--{prefix}grace", type=int, default=d.grace, help="ASHA grace period in epochs (default: %(default)s)")
    p.add_argument(f"--{prefix}reduction", type=int, default=d.reduction, help="ASHA reduction factor (default: %(default)s)")
    p.add_argument(f"--{prefix}no-asha", action="store_true", help="run every trial to the end (FIFO)")
    p.add_argument(f"--{prefix}concurrency", type=int, default=d.concurrency, help="trials at once, 1 CPU each (default: %(default)s)")
    p.add_argument(f"--{prefix}no-reference", action="store_true", help="do not run the foundation default as the reference trial")
    p.add_argument(f"--{prefix}register-top", type=int, default=d.register_top, help="front members to register (default: %(default)s)")
    p.add_argument(f"--{prefix}seed", type=int, default=d.seed, help="searcher and training seed (default: %(default)s)")
    p.add_argument(f"--{prefix}train-limit", type=int, default=None, help="train on the first N samples only (quick runs)")
    p.add_argument(f"--{prefix}darts-epochs", type=int, default=DartsConfig().epochs, help="DARTS supernet search epochs (default: %(default)s)")
    p.add_argument(f"--{prefix}out", default="out/nas", help="folder for the table, the front PNG and the JSON (default: %(default)s)")


def config_from_args(a: argparse.Namespace, *, prefix: str = "", dataset: str | None = None) -> NASConfig:
    """Parse at the edge: the namespace becomes a validated NASConfig (errors name the fix)."""
    g = lambda name: getattr(a, (prefix + name).replace("-", "_"))  # noqa: E731
    d = NASConfig()
    return NASConfig(
        dataset=dataset or a.dataset or d.dataset, searcher=g("searcher"), trials=g("trials"), time_budget_min=g("time-budget"),
        epochs=g("epochs"), grace=g("grace"), reduction=g("reduction"), asha=not g("no-asha"), concurrency=g("concurrency"),
        include_default=not g("no-reference"), register_top=g("register-top"), seed=g("seed"), train_limit=g("train-limit"),
        darts=replace(d.darts, epochs=g("darts-epochs")),
    )


def run(a: argparse.Namespace) -> dict:
    cfg = config_from_args(a)  # bad input fails here, before Ray starts
    connect(num_cpus=max(2, cfg.concurrency))
    result = run_search(cfg, ModelRegistry(), out_dir=a.out)
    print(format_table(result), flush=True)
    return result.section()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.nas", description=__doc__.splitlines()[0])
    add_nas_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(), indent=2, default=str))
