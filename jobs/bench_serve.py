"""Serving benchmark: the dynray graph against static all-cloud, edge-only and a no-op floor.

Each system is deployed on its own (same replicas, same simulated profiles from
``cluster/serve.yaml``), driven by one closed-loop async HTTP load generator on loopback
(fixed concurrency and request count; one test image per request, sent as ``array_b64``
uint8 because JSON-parsing 784 floats costs more than the model), measured, and removed.
A chaos run then kills one edge replica and the cloud replica under load.

    python -m jobs.bench_serve --dataset mnist-5k --json out.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import threading
import time

import numpy as np

from dynray.bench import merge_section
from dynray.data import load_dataset
from dynray.bench.load import LoadConfig, LoadResult, run_load_sync
from dynray.serving.payload import encode_array
from dynray.registry import ModelRegistry
from jobs._ray import connect, free_port

log = logging.getLogger(__name__)
SYSTEMS = ("noop", "dynray", "all_cloud", "edge_only")


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=2000, help="measured requests per system")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop concurrency")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured requests before each run")
    p.add_argument("--light-concurrency", type=int, default=2, help="concurrency of the second, light-load run per system (latency without CPU queueing)")
    p.add_argument("--light-requests", type=int, default=400, help="requests of the light-load run (0: skip it)")
    p.add_argument("--chaos-requests", type=int, default=1500, help="requests in the chaos run (0: skip it)")
    p.add_argument("--autoscale-requests", type=int, default=6000, help="requests of the autoscaling run: edge starts at 1 replica, may grow to 3 (0: skip it)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS, help="systems to measure (the ratios need all four)")
    p.add_argument("--config", default=None, help="Serve config to take args and profiles from (default cluster/serve.yaml)")



def system_config(base: dict, system: str, ref: str, home: str, port: int, *, router: str | None = None) -> dict:
    """One-app config for ``system``; replicas pinned (min = max) so every system gets the same."""
    cfg = copy.deepcopy(base)
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    app = cfg["applications"][0]
    args = app["args"]
    args.update(system=system, home=home, models=[ref])
    if router is not None:
        args["router"] = router
    for tier in ("edge", "cloud"):
        t = args.get(tier, {})
        n = t.get("min_replicas", 1)
        args[tier] = {**t, "min_replicas": n, "max_replicas": n}
    app.update(name=system, route_prefix=f"/{system}")
    from actors.serve_apps import app_config
    from dynray.serving.config import AppArgs

    app["deployments"] = app_config(AppArgs.model_validate(args), name=system, route_prefix=f"/{system}")["deployments"]
    cfg["applications"] = [app]
    return cfg


def _measure(url: str, images: np.ndarray, *, requests: int, concurrency: int, warmup: int) -> LoadResult:
    n = len(images)
    bodies = [encode_array(images[i : i + 1], dtype="uint8") for i in range(n)]
    cfg = LoadConfig(url=url, requests=requests, concurrency=concurrency, warmup=warmup, timeout_s=30)
    return run_load_sync(cfg, lambda i: bodies[i % n])


def _summarise(res: LoadResult, labels: np.ndarray, *, model: bool) -> dict:
    s = {"rps": round(res.rps, 1), "p50_ms": round(res.p50_ms, 2), "p99_ms": round(res.p99_ms, 2), "errors": res.errors}
    if not model:
        return s
    ok = [r for r in res.records if r.ok]
    n = len(labels)
    s["accuracy"] = round(float(np.mean([r.body["predictions"][0] == labels[r.index % n] for r in ok])), 4)
    s["cost_per_1k"] = round(1000 * float(np.mean([r.body["cost"] for r in ok])), 2)
    s["escalated_frac"] = round(float(np.mean([t == "cloud" for r in ok for t in r.body["tier"]])), 4)
    s["degraded"] = sum(bool(r.body["degraded"]) for r in ok)
    s["mean_macs"] = round(float(np.mean([r.body["macs"][0] for r in ok])), 1)
    return s


def _chaos(url: str, images: np.ndarray, a: argparse.Namespace, app: str) -> dict:
    import ray

    from actors.serve_apps import app_status

    def replicas(dep: str) -> list[str]:
        return [x["name"] for x in ray.util.list_named_actors(all_namespaces=True) if x["name"].startswith(f"SERVE_REPLICA::{app}#{dep}#")]

    def replaced(dep: str, n: int, dead: str) -> bool:
        names = replicas(dep)
        return dead not in names and len(names) >= n and app_status(app)["deployments"][dep]["replicas"].get("RUNNING", 0) >= n

    n_edge, n_cloud = len(replicas("Edge")), len(replicas("Cloud"))
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("res", _measure(url, images, requests=a.chaos_requests, concurrency=min(a.concurrency, 8), warmup=0)))
    t.start()
    time.sleep(1.0)
    recovery = []
    for dep, n in (("Edge", n_edge), ("Cloud", n_cloud)):
        victim = replicas(dep)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed = time.monotonic()
        while not replaced(dep, n, victim) and time.monotonic() - killed < 60:
            time.sleep(0.2)
        recovery.append(round(time.monotonic() - killed, 2))
        log.info("killed one %s replica: back to %d running after %.1f s", dep, n, recovery[-1])
    t.join(timeout=600)
    res: LoadResult = out["res"]
    ok = [r for r in res.records if r.ok]
    return {
        "requests": a.chaos_requests,
        "answered": len(ok),
        "degraded": sum(bool(r.body["degraded"]) for r in ok),
        "errors": res.errors,
        "status": {str(k): v for k, v in res.status_counts().items()},
        "recovery_s": max(recovery),
        "recovery_s_per_kill": {"edge": recovery[0], "cloud": recovery[1]},
    }


def _autoscale(base: dict, ref: str, home: str, port: int, images: np.ndarray, a: argparse.Namespace) -> dict:
    """Edge tier from 1 replica (max 3, target 1 ongoing request each) under concurrency 24: when does Serve add replicas?

    The ingress coalesces concurrent requests, so an edge replica sees few, large calls:
    the target is per call, hence 1."""
    from actors.serve_apps import app_status, deploy

    cfg = system_config(base, "dynray", ref, home, port)
    args = cfg["applications"][0]["args"]
    args["edge"] = {**args["edge"], "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1}
    deploy(cfg, timeout_s=180)
    timeline: list[tuple[float, int]] = []
    t0 = time.monotonic()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            timeline.append((round(time.monotonic() - t0, 1), app_status("dynray")["deployments"]["Edge"]["replicas"].get("RUNNING", 0)))
            time.sleep(0.5)

    w = threading.Thread(target=watch)
    w.start()
    try:
        res = _measure(f"http://127.0.0.1:{port}/dynray/v1/predict", images, requests=a.autoscale_requests, concurrency=24, warmup=0)
    finally:
        done.set()
        w.join()
    start = timeline[0][1]
    peak = max(n for _, n in timeline)
    first_up = next((t for t, n in timeline if n > start), None)
    return {"tier": "edge", "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "concurrency": 24, "requests": a.autoscale_requests,
            "replicas_start": start, "replicas_peak": peak, "seconds_to_first_scale_up": first_up, "errors": res.errors, "run_s": round(res.wall_s, 1),
            "timeline": timeline[::4]}


def run(a: argparse.Namespace) -> dict:
    from ray import serve

    from actors import serve_apps as D

    reg = ModelRegistry()
    info = reg.resolve(a.model)
    test = load_dataset(a.dataset or info.meta["dataset"], "test")
    images = np.clip(np.rint(test.images.numpy() * 255), 0, 255).astype(np.uint8) / 255.0  # what the uint8 wire form carries
    labels = test.labels.numpy()
    connect(log_to_driver=False)  # forwarding every replica's log lines costs CPU the measurement needs
    base = D.load_config(a.config) if a.config else D.load_config()
    port = free_port()
    systems: dict[str, dict] = {}
    try:
        for system in a.systems:
            cfg = system_config(base, system, info.ref, str(reg.home.resolve()), port)
            log.info("deploying %s …", system)
            D.deploy(cfg, timeout_s=180)
            url = f"http://127.0.0.1:{port}/{system}/v1/predict"
            res = _measure(url, images, requests=a.requests, concurrency=a.concurrency, warmup=a.warmup)
            systems[system] = _summarise(res, labels, model=system != "noop")
            if a.light_requests:  # the same system far from saturation: latency of the path itself
                light = _measure(url, images, requests=a.light_requests, concurrency=a.light_concurrency, warmup=20)
                systems[system]["light"] = {"concurrency": a.light_concurrency, **{k: v for k, v in _summarise(light, labels, model=False).items()}}
            log.info("%s: %s", system, systems[system])
            if system == "dynray" and a.chaos_requests:
                chaos = _chaos(f"http://127.0.0.1:{port}/{system}/v1/predict", images, a, system)
                log.info("chaos: %s", chaos)
            serve.delete(system)
        if a.autoscale_requests:
            autoscale = _autoscale(base, info.ref, str(reg.home.resolve()), port, images, a)
            log.info("autoscale: %s", {k: v for k, v in autoscale.items() if k != "timeline"})
            serve.delete("dynray")
    finally:
        D.shutdown()
    d, c, noop = (systems.get(k) for k in ("dynray", "all_cloud", "noop"))
    section = {
        "model": info.ref,
        "dataset": test.name,
        "requests": a.requests,
        "concurrency": a.concurrency,
        "payload": "array_b64 uint8, 1 image per request, closed loop on loopback (aiohttp)",
        "profiles": {t: base["applications"][0]["args"][t].get("profile") for t in ("edge", "cloud")},
        "systems": systems,
        "chaos": chaos if a.chaos_requests else None,
        "autoscale": autoscale if a.autoscale_requests else None,
        "ratios": {
            "accuracy_gap_pt": round(100 * (c["accuracy"] - d["accuracy"]), 2),
            "cost_vs_all_cloud": round(d["cost_per_1k"] / c["cost_per_1k"], 4),
            "p50_vs_all_cloud": round(d["p50_ms"] / c["p50_ms"], 4),
            "p50_vs_all_cloud_light": round(d["light"]["p50_ms"] / c["light"]["p50_ms"], 4) if "light" in d else None,
            "rps_vs_noop": round(d["rps"] / noop["rps"], 4),
        } if d and c and noop else {},
    }
    merge_section(a.json, "serve", section)
    return section


def main(argv: list[str] | None = None) -> dict:
    from jobs.bench import add_bench_args

    p = argparse.ArgumentParser(prog="python -m jobs.bench_serve", description=__doc__.splitlines()[0])
    add_bench_args(p)
    add_bench_serve_args(p)
    return run(p.parse_args(["serve", *(argv or [])]))


if __name__ == "__main__":
    import json
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(sys.argv[1:]), indent=2))
