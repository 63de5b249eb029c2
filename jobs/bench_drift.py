"""Ray job: the drift watch on the live service; merges the "drift" section of the bench JSON.

    python -m jobs.bench_drift --dataset mnist-5k --json out/bench.json
    dynray bench drift --dataset mnist-5k --json out/bench.json

Deploys the dynray graph (auth on, one ingress replica: each ingress replica watches the
traffic it answers, so one replica makes "requests until the alarm" the service's own
count) with a calibrated model, whose registry entry holds the drift reference. Per seed:

- ``--in-distribution-requests`` test digits resampled with light augmentation
  (:func:`dynray.bench.drift.in_distribution`), at concurrency 4: the alarms they raise are
  false alarms;
- for each shift (inverted, rotated 90 degrees, Gaussian noise sigma 0.3): calm traffic
  until the watch reports "ok", then shifted digits one request at a time, reading
  ``GET /v1/models`` after each, until the alarm (at most ``--shift-requests``);
- the watch's own time per request (measured inside the ingress) against the ingress's
  time per request (the answers' ``latency_ms``): ``overhead_frac``.

Every request and drift reading goes to ``drift_runlog.jsonl`` beside the JSON
(`dynray report --runlog` plots it).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.drift import SHIFTS, in_distribution, shifted
from dynray.bench.load import LoadConfig, run_load_sync
from dynray.data import load_dataset
from dynray.drift import DriftReference
from dynray.errors import ConfigError, DynrayError
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import ModelRegistry
from dynray.runlog import RunLog
from dynray.security.keys import KeyStore
from dynray.serving.payload import encode_array
from jobs._ray import connect, free_port
from jobs.bench_serve import system_config

__all__ = ["Config", "run", "main"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """Measure the drift watch over HTTP: requests to the alarm per shift, false alarms, its cost; merge the "drift" section."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the streams (which digits, the augmentation, the noise); a target holds only if it holds for each."""
    in_distribution_requests: int = 5000
    """Lightly augmented test digits per seed (one per request)."""
    shift_requests: int = 400
    """Most shifted requests sent per shift before it counts as never alarmed."""
    calm_requests: int = 150
    """In-distribution requests before each shift (the watch must report "ok" after them)."""
    concurrency: int = 4
    """Concurrency of the in-distribution traffic (the shifted digits go one at a time)."""

    def __post_init__(self) -> None:
        if not self.seeds or self.in_distribution_requests < 1 or self.shift_requests < 1 or self.calm_requests < 1 or self.concurrency < 1:
            raise ConfigError("seeds must be non-empty and every count >= 1", got=self, fix="e.g. --seeds 0 1 2 --in-distribution-requests 5000")


class _Service:
    """The deployed app: predict, and the drift watch's state for one version; every request
    and drift reading goes to the run log."""

    def __init__(self, base: str, key: str, version: str, runlog: RunLog) -> None:
        self.url, self.version, self.runlog = f"{base}/v1/predict", version, runlog
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        self.base, self.key = base, key
        self.phase = "start"

    def drift(self) -> dict:
        r = self.http.get(f"{self.base}/v1/models", timeout=30)
        r.raise_for_status()
        self.runlog.drift(r.json())
        return r.json()["drift"]

    def state(self) -> dict:
        return self.drift()["versions"][self.version]

    def send(self, images: torch.Tensor, concurrency: int) -> list[float]:
        """Send each image as one request; the ingress-side latency of each answer."""
        bodies = [encode_array(images[i : i + 1], dtype="uint8") for i in range(len(images))]
        res = run_load_sync(LoadConfig(url=self.url, requests=len(bodies), concurrency=concurrency, timeout_s=30, api_key=self.key), lambda i: bodies[i])
        self.runlog.requests(res.records, wall_s=res.wall_s, phase=self.phase)
        if res.errors:
            raise DynrayError("requests failed during the drift bench", got=res.status_counts(), fix="check `dynray serve status` and the Serve logs")
        return [r.body["latency_ms"] for r in res.records]

    def post(self, image: torch.Tensor) -> None:
        t0 = time.perf_counter()
        r = self.http.post(self.url, json=encode_array(image[None], dtype="uint8"), timeout=30)
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise DynrayError("a request failed during the drift bench", got=(r.status_code, r.text[:200]), fix="check `dynray serve status`")
        body = r.json()
        self.runlog.write([{"kind": "request", "t": round(time.time(), 4), "status": 200, "latency_ms": round(ms, 3), "exit": body["exit"],
                            "tier": body["tier"], "model_version": body["model_version"], "phase": self.phase}])


def _calm(svc: _Service, test: torch.Tensor, cfg: Config, seed: int) -> int:
    """In-distribution traffic until the watch is not alarmed; returns requests sent."""
    sent = 0
    svc.phase = "calm"
    for attempt in range(4):
        svc.send(in_distribution(test, cfg.calm_requests, seed=10_000 * seed + attempt), cfg.concurrency)
        sent += cfg.calm_requests
        if svc.state()["status"] == "ok":
            return sent
    raise DynrayError("the drift watch did not calm down on in-distribution traffic", got=svc.state(), fix="a larger --calm-requests, or check the reference")


def _to_alarm(svc: _Service, stream: torch.Tensor) -> int | None:
    """Send ``stream`` one request at a time; the 1-based request at which an alarm was raised."""
    before = svc.state()["alarms"]
    for i, x in enumerate(stream):
        svc.post(x)
        if svc.state()["alarms"] > before:
            return i + 1
    return None


def _seed(svc: _Service, test: torch.Tensor, cfg: Config, seed: int) -> dict:
    before = svc.state()["alarms"]
    svc.phase = f"seed {seed}: in-distribution"
    lat = svc.send(in_distribution(test, cfg.in_distribution_requests, seed=seed), cfg.concurrency)
    false_alarms = svc.state()["alarms"] - before
    log.info("seed %d: %d in-distribution requests, %d false alarm(s)", seed, cfg.in_distribution_requests, false_alarms)
    shifts = {}
    for k, name in enumerate(SHIFTS):
        calm = _calm(svc, test, cfg, seed)
        svc.phase = name
        n = _to_alarm(svc, shifted(name, test, cfg.shift_requests, seed=100 * seed + k))
        st = svc.state()
        shifts[name] = {"requests_to_alarm": n, "calm_requests": calm, "score": st["score"], "feature": st["feature"]}
        log.info("seed %d: %s alarmed after %s requests (score %.3f on %s)", seed, name, n, st["score"], st["feature"])
    return {"seed": seed, "in_distribution": {"requests": cfg.in_distribution_requests, "false_alarms": false_alarms,
                                              "ingress_latency_ms_mean": round(float(np.mean(lat)), 3)}, "shifts": shifts}


def run(cfg: Config) -> BenchResult:
    from actors import serve_apps as D

    check_bench_file(cfg.json)
    reg = ModelRegistry()
    info = reg.resolve(cfg.model)
    ref = DriftReference.from_meta(info.meta)
    if ref is None:
        raise ConfigError("this model version has no drift reference", got=info.ref, fix=f"calibrate it first: `dynray calibrate --model {info.ref} --max-drop 0.002` (calibration saves the reference)")
    test = load_dataset(cfg.dataset or info.meta["dataset"], "test").images
    connect(log_to_driver=False)
    port = free_port()
    app_cfg = system_config(D.load_config(), "dynray", info.ref, str(reg.home.resolve()), port, auth=True)
    args = app_cfg["applications"][0]["args"]
    args["ingress"] = {**args.get("ingress", {}), "replicas": 1}
    store = KeyStore.at_home(reg.home)
    key, rec = store.create("bench-drift", rate_per_s=1e5, ttl_s=86400)
    try:
        log.info("deploying the dynray app with %s (one ingress replica) …", info.ref)
        D.deploy(app_cfg, timeout_s=240)
        runlog = RunLog(Path(cfg.json).with_name("drift_runlog.jsonl"), fresh=True)
        svc = _Service(f"http://127.0.0.1:{port}/dynray", key, info.ref, runlog)
        runs = [_seed(svc, test, cfg, s) for s in cfg.seeds]
        watch = svc.drift()
    finally:
        D.shutdown()
        store.revoke(rec.id)
    cost = watch["cost_ms_per_request"]
    lat = float(np.mean([r["in_distribution"]["ingress_latency_ms_mean"] for r in runs]))
    worst = {name: max((r["shifts"][name]["requests_to_alarm"] or float("inf")) for r in runs) for name in SHIFTS}
    section = {
        "dataset": cfg.dataset or info.meta["dataset"], "model": info.ref, "seeds": list(cfg.seeds), "ingress_replicas": 1,
        "detector": {k: v for k, v in watch["versions"][info.ref].items() if k in ("threshold", "window", "alpha")},
        "shifts": {name: {"requests_to_alarm": None if worst[name] == float("inf") else int(worst[name]),
                          "per_seed": [r["shifts"][name]["requests_to_alarm"] for r in runs]} for name in SHIFTS},
        "in_distribution": {"requests": cfg.in_distribution_requests, "false_alarms": max(r["in_distribution"]["false_alarms"] for r in runs),
                            "per_seed": [r["in_distribution"]["false_alarms"] for r in runs]},
        "overhead_frac": round(cost / lat, 5), "detector_ms_per_request": round(cost, 4), "ingress_ms_per_request": round(lat, 3),
        "runs": runs, "runlog": str(runlog.path),
    }
    merge_section(cfg.json, "drift", section)
    return BenchResult("drift", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_drift") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_drift"))
