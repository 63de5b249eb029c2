"""``dynray bench nas``: run the budgeted search and merge the ``"nas"`` section.

Defaults are the issue's budget: 30 trials (the foundation-default reference included),
15 minutes, evolution + ASHA on 2 CPUs. The front PNG and the table land next to the JSON.

    python -m jobs.bench nas --dataset mnist-5k --json out/bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dynray.bench import merge_section
from dynray.nas import run_search
from dynray.bench.nas import format_table
from dynray.registry import ModelRegistry
from jobs._ray import connect
from jobs.nas import add_nas_args, config_from_args

log = logging.getLogger(__name__)


def add_bench_nas_args(p) -> None:
    add_nas_args(p, prefix="nas-")


def run(a: argparse.Namespace) -> dict:
    cfg = config_from_args(a, prefix="nas-", dataset=a.dataset or "mnist-5k")
    out = Path(a.nas_out) if a.nas_out != "out/nas" else Path(a.json).parent / "nas"
    connect(num_cpus=max(2, cfg.concurrency))
    result = run_search(cfg, ModelRegistry(), out_dir=out)
    print(format_table(result), flush=True)
    section = result.section()
    merge_section(a.json, "nas", section)
    return section


def main(argv: list[str] | None = None) -> dict:
    from jobs.bench import add_bench_args

    p = argparse.ArgumentParser(prog="python -m jobs.bench_nas", description=__doc__.splitlines()[0])
    add_bench_args(p)
    return run(p.parse_args(["nas", *(argv or [])]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(), indent=2, default=str))
