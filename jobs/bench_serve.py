"""Serving benchmark: the dynray graph against static all-cloud, the same adaptive net all in the cloud, edge-only and a no-op floor.

Each system is deployed on its own (same replicas, same simulated profiles from
``cluster/serve.yaml``), driven by one closed-loop async HTTP load generator on loopback
(fixed concurrency and request count; one test image per request, sent as ``array_b64``
uint8 because JSON-parsing 784 floats costs more than the model), measured, and removed.
A chaos run then kills one edge replica and the cloud replica under load, and an
autoscaling run lets the edge tier grow from one replica. Measuring and summarising is
:mod:`dynray.bench.serve`; this job is the driver that needs a live cluster. The systems
run with API keys off (``auth: {enabled: false}``), as the serving numbers were first
measured; what the key check and the global rate limit add per request is measured by
``dynray bench security``.

    python -m jobs.bench_serve --dataset mnist-5k --json out/bench.json
    dynray bench serve --json out/bench.json
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.serve import measure, summarise, wire_images
from dynray.data import load_dataset
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import ModelRegistry
from jobs._ray import connect, free_port
from jobs.serve_chaos import ChaosConfig, kill_devices_under_load, kill_ingress_under_load

__all__ = ["SYSTEMS", "Config", "system_config", "run", "main"]

log = logging.getLogger(__name__)
SYSTEMS = ("noop", "dynray", "all_cloud", "cloud_adaptive", "edge_only")
System = Literal["noop", "dynray", "all_cloud", "cloud_adaptive", "edge_only"]


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """Measure the serving graph over HTTP against its baselines; merge the "serve" section."""

    requests: int = 2000
    """Measured requests per system."""
    concurrency: int = 16
    """Closed-loop concurrency."""
    warmup: int = 200
    """Unmeasured requests before each run."""
    light_concurrency: int = 2
    """Concurrency of the second, light-load run per system (latency without CPU queueing)."""
    light_requests: int = 400
    """Requests of the light-load run (0: skip it)."""
    chaos_requests: int = 1500
    """Requests in the chaos run (0: skip it)."""
    autoscale_requests: int = 6000
    """Requests of the autoscaling run: edge starts at 1 replica, may grow to 3 (0: skip it)."""
    systems: tuple[System, ...] = SYSTEMS  # type: ignore[assignment]
    """Systems to measure (the ratios need all four)."""
    config: str | None = None
    """Serve config to take args and profiles from (default: cluster/serve.yaml)."""


def system_config(base: dict, system: str, ref: str, home: str, port: int, *, router: str | None = None, auth: bool | None = None) -> dict:
    """One-app config for ``system``; replicas pinned (min = max) so every system gets the same.
    ``auth``: API keys on or off (None: as ``base`` says)."""
    cfg = copy.deepcopy(base)
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    app = cfg["applications"][0]
    args = app["args"]
    args.update(system=system, home=home, models=[ref])
    if auth is not None:
        args["auth"] = {**args.get("auth", {}), "enabled": auth}
    if router is not None:
        args["router"] = {**args.get("router", {}), "kind": router}
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


def _chaos(url: str, images: np.ndarray, cfg: Config, app: str) -> dict:
    """One edge replica, then the cloud replica, killed under load (jobs.serve_chaos)."""
    res = kill_devices_under_load(ChaosConfig(url=url, app=app, requests=cfg.chaos_requests, concurrency=min(cfg.concurrency, 8)), images)
    return res.to_dict()


def _ingress_kill(url: str, images: np.ndarray, cfg: Config, app: str) -> dict:
    """One of the two ingress replicas killed under load; answered with at most one client retry, and without."""
    res = kill_ingress_under_load(ChaosConfig(url=url, app=app, requests=cfg.chaos_requests, concurrency=min(cfg.concurrency, 8), retries=1), images)
    return res.to_dict()


def _autoscale(base: dict, ref: str, home: str, port: int, images: np.ndarray, cfg: Config) -> dict:
    """Edge tier from 1 replica (max 3, target 1 ongoing request each) under concurrency 24: when does Serve add replicas?

    The ingress coalesces concurrent requests, so an edge replica sees few, large calls:
    the target is per call, hence 1."""
    from actors.serve_apps import app_status, deploy

    app_cfg = system_config(base, "dynray", ref, home, port, auth=False)
    args = app_cfg["applications"][0]["args"]
    args["edge"] = {**args["edge"], "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1}
    deploy(app_cfg, timeout_s=180)
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
        res = measure(f"http://127.0.0.1:{port}/dynray/v1/predict", images, requests=cfg.autoscale_requests, concurrency=24, warmup=0)
    finally:
        done.set()
        w.join()
    start = timeline[0][1]
    peak = max(n for _, n in timeline)
    first_up = next((t for t, n in timeline if n > start), None)
    return {"tier": "edge", "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "concurrency": 24, "requests": cfg.autoscale_requests,
            "replicas_start": start, "replicas_peak": peak, "seconds_to_first_scale_up": first_up, "errors": res.errors, "run_s": round(res.wall_s, 1),
            "timeline": timeline[::4]}


def run(cfg: Config) -> BenchResult:
    from ray import serve

    from actors import serve_apps as D

    check_bench_file(cfg.json)  # a file that could not be merged into is refused before the run
    reg = ModelRegistry()
    info = reg.resolve(cfg.model)
    test = load_dataset(cfg.dataset or info.meta["dataset"], "test")
    images = wire_images(test)
    labels = test.labels.numpy()
    connect(log_to_driver=False)  # forwarding every replica's log lines costs CPU the measurement needs
    base = D.load_config(cfg.config) if cfg.config else D.load_config()
    port = free_port()
    systems: dict[str, dict] = {}
    try:
        for system in cfg.systems:
            app_cfg = system_config(base, system, info.ref, str(reg.home.resolve()), port, auth=False)
            log.info("deploying %s …", system)
            D.deploy(app_cfg, timeout_s=180)
            url = f"http://127.0.0.1:{port}/{system}/v1/predict"
            res = measure(url, images, requests=cfg.requests, concurrency=cfg.concurrency, warmup=cfg.warmup)
            systems[system] = summarise(res, labels, model=system != "noop")
            if cfg.light_requests:  # the same system far from saturation: latency of the path itself
                light = measure(url, images, requests=cfg.light_requests, concurrency=cfg.light_concurrency, warmup=20)
                systems[system]["light"] = {"concurrency": cfg.light_concurrency, **{k: v for k, v in summarise(light, labels, model=False).items()}}
            log.info("%s: %s", system, systems[system])
            if system == "dynray" and cfg.chaos_requests:
                chaos = _chaos(f"http://127.0.0.1:{port}/{system}/v1/predict", images, cfg, system)
                log.info("chaos: %s", chaos)
                ingress_kill = _ingress_kill(f"http://127.0.0.1:{port}/{system}/v1/predict", images, cfg, system)
                log.info("ingress kill: %s", ingress_kill)
            serve.delete(system)
        if cfg.autoscale_requests:
            autoscale = _autoscale(base, info.ref, str(reg.home.resolve()), port, images, cfg)
            log.info("autoscale: %s", {k: v for k, v in autoscale.items() if k != "timeline"})
            serve.delete("dynray")
    finally:
        D.shutdown()
    d, c, noop, ca = (systems.get(k) for k in ("dynray", "all_cloud", "noop", "cloud_adaptive"))
    section = {
        "model": info.ref,
        "dataset": test.name,
        "requests": cfg.requests,
        "concurrency": cfg.concurrency,
        "payload": "array_b64 uint8, 1 image per request, closed loop on loopback (aiohttp)",
        "profiles": {t: base["applications"][0]["args"][t].get("profile") for t in ("edge", "cloud")},
        "systems": systems,
        "chaos": chaos if cfg.chaos_requests else None,
        "ingress_kill": ingress_kill if cfg.chaos_requests else None,
        "autoscale": autoscale if cfg.autoscale_requests else None,
        "ratios": {
            "accuracy_gap_pt": round(100 * (c["accuracy"] - d["accuracy"]), 2),
            "cost_vs_all_cloud": round(d["cost_per_1k"] / c["cost_per_1k"], 4),
            "p50_vs_all_cloud": round(d["p50_ms"] / c["p50_ms"], 4),
            "p50_vs_all_cloud_light": round(d["light"]["p50_ms"] / c["light"]["p50_ms"], 4) if "light" in d else None,
            "rps_vs_noop": round(d["rps"] / noop["rps"], 4),
            # early exit alone (the adaptive net, all in the cloud) against the full net in the cloud,
            # and the edge/cloud split on top of it: cost and p50 of dynray against cloud_adaptive
            **({"cost_cloud_adaptive_vs_all_cloud": round(ca["cost_per_1k"] / c["cost_per_1k"], 4),
                "p50_cloud_adaptive_vs_all_cloud": round(ca["p50_ms"] / c["p50_ms"], 4),
                "cost_vs_cloud_adaptive": round(d["cost_per_1k"] / ca["cost_per_1k"], 4),
                "p50_vs_cloud_adaptive": round(d["p50_ms"] / ca["p50_ms"], 4),
                "p50_vs_cloud_adaptive_light": round(d["light"]["p50_ms"] / ca["light"]["p50_ms"], 4) if "light" in d and "light" in ca else None} if ca else {}),
        } if d and c and noop else {},
    }
    merge_section(cfg.json, "serve", section)
    return BenchResult("serve", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_serve") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_serve"))
