"""Ray job: benchmark a registered model and merge the section into a bench JSON file.

    python -m jobs.bench core --dataset mnist-5k --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging

from dynray.bench import SECTIONS
from dynray.errors import ConfigError
from dynray.pipeline import bench_and_write
from dynray.registry import ModelRegistry

IMPLEMENTED = ("core", "serve", "router", "moe", "nas")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("section", choices=SECTIONS, help="bench section")
    p.add_argument("--model", default=None, help="model ref (default: production, else newest)")
    p.add_argument("--dataset", default=None, help="dataset (default: the model's own)")
    p.add_argument("--json", required=True, help="bench JSON file to write or merge into")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    from jobs.bench_serve import add_bench_serve_args

    add_bench_serve_args(p.add_argument_group("serve section"))
    from jobs.bench_router import add_bench_router_args

    add_bench_router_args(p.add_argument_group("router section"))
    from jobs.bench_moe import add_bench_moe_args

    add_bench_moe_args(p.add_argument_group("moe section"))
    from jobs.bench_nas import add_bench_nas_args

    add_bench_nas_args(p.add_argument_group("nas section"))


def run(a: argparse.Namespace) -> dict:
    if a.section not in IMPLEMENTED:
        raise ConfigError(f"bench section '{a.section}' is not built yet", got=a.section, fix=f"available now: {', '.join(IMPLEMENTED)}")
    if a.section == "serve":
        from jobs import bench_serve

        return bench_serve.run(a)
    if a.section == "router":
        from jobs import bench_router

        return bench_router.run(a)
    if a.section == "moe":
        from jobs import bench_moe

        return bench_moe.run(a)
    if a.section == "nas":
        from jobs import bench_nas

        return bench_nas.run(a)
    return bench_and_write(ModelRegistry(), a.model, dataset=a.dataset, json_path=a.json, plot_path=a.plot)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    add_bench_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(), indent=2))
