"""Deploy the dynray graph on the local Ray, send a split over HTTP, report what happened.

    python -m jobs.http_traffic [--model REF] [--dataset D] [--split test] [--concurrency 8]

The last step of the demo: every image of the split goes through the real HTTP API
(``array_b64`` uint8, one image per request) with a closed-loop async client; the
summary gives accuracy, the exit mix, the share escalated to the cloud tier and the
latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter

import numpy as np

from dynray.data import load_dataset
from dynray.bench.load import LoadConfig, run_load_sync
from dynray.serving.payload import encode_array
from dynray.registry import ModelRegistry
from jobs._ray import connect, free_port

log = logging.getLogger(__name__)


def add_traffic_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model ref (default: production, else newest)")
    p.add_argument("--dataset", default=None, help="dataset (default: the model's own)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop HTTP concurrency")
    p.add_argument("--router", default="thresholds", choices=["thresholds", "ppo", "hybrid"], help="stop/escalate router the graph serves with (default: %(default)s)")



def run(a: argparse.Namespace) -> dict:
    from actors import serve_apps as D
    from jobs.bench_serve import system_config

    reg = ModelRegistry()
    info = reg.resolve(a.model)
    split = load_dataset(a.dataset or info.meta["dataset"], a.split)
    images = split.images.numpy()
    labels = split.labels.numpy()
    connect(log_to_driver=False)
    port = free_port()
    D.deploy(system_config(D.load_config(), "dynray", info.ref, str(reg.home.resolve()), port, router=getattr(a, "router", None)), timeout_s=180)
    try:
        bodies = [encode_array(images[i : i + 1], dtype="uint8") for i in range(len(images))]
        res = run_load_sync(LoadConfig(url=f"http://127.0.0.1:{port}/dynray/v1/predict", requests=len(images), concurrency=a.concurrency, warmup=50), lambda i: bodies[i])
    finally:
        D.shutdown()
    ok = [r for r in res.records if r.ok]
    exits = Counter(r.body["exit"][0] for r in ok)
    return {
        "model": info.ref,
        "router": ok[0].body.get("router") if ok else None,
        "split": f"{split.name}/{a.split}",
        "requests": len(images),
        "answered": len(ok),
        "accuracy": float(np.mean([r.body["predictions"][0] == labels[r.index] for r in ok])) if ok else float("nan"),
        "exit_mix": {int(k): round(v / max(len(ok), 1), 4) for k, v in sorted(exits.items())},
        "escalated_frac": float(np.mean([r.body["tier"][0] == "cloud" for r in ok])) if ok else float("nan"),
        "degraded": sum(bool(r.body["degraded"]) for r in ok),
        "rps": round(res.rps, 1),
        "p50_ms": round(res.p50_ms, 2),
        "p99_ms": round(res.p99_ms, 2),
        "status": {str(k): v for k, v in res.status_counts().items()},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.http_traffic", description=__doc__.splitlines()[0])
    add_traffic_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(), indent=2))
