"""Ray job: deploy the dynray graph on the local Ray, send a split over HTTP, report what happened.

    python -m jobs.http_traffic [--model REF] [--dataset D] [--split test] [--concurrency 8] [--router hybrid] [--limit N]

The last step of the demo: every image of the split goes through the real HTTP API
(``array_b64`` uint8, one image per request) with a closed-loop async client. Auth is on
(``cluster/serve.yaml``), so the job creates an API key for the run, sends it as any
client would (``Authorization: Bearer``) and revokes it at the end; the summary
gives accuracy, the exit mix, the share escalated to the cloud tier, the latency
percentiles (measured by :mod:`dynray.bench.serve`) and the drift watch's score. Then the
operations tour (:mod:`jobs.ops_tour`) exercises auth, the rate limit, the extraction
detector, cloud failover and the drift alarm, and reads every metric back.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import requests
from dataclasses import dataclass
from typing import Literal

from dynray.bench.load import LoadConfig, run_load_sync
from dynray.bench.serve import exit_mix, summarise, wire_images
from dynray.data import load_dataset
from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import ModelRegistry
from dynray.runlog import DriftPoller, RunLog
from dynray.security.keys import KeyStore
from dynray.serving.config import AppArgs
from dynray.serving.payload import encode_array
from jobs import ops_tour
from jobs._ray import connect, free_port
from jobs.bench_serve import system_config
from jobs.ops_tour import TourResult

__all__ = ["Config", "Result", "run", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Serve a model on the local Ray and send a whole split through the HTTP API."""

    model: str | None = None
    """Model ref (default: production, else the newest)."""
    dataset: str | None = None
    """Dataset (default: the model's own)."""
    split: Literal["train", "val", "test"] = "test"
    """Split whose images are sent, one per request."""
    concurrency: int = 8
    """Closed-loop HTTP concurrency."""
    router: Literal["thresholds", "ppo", "hybrid"] = "thresholds"
    """Stop/escalate router the graph serves with."""
    limit: int | None = None
    """Send only the first N images of the split (default: all of them)."""
    tour: bool = True
    """Then the operations tour (jobs/ops_tour.py): 401/429, an extraction-style client, the cloud
    replica killed under load, inverted digits for the drift alarm, and every dynray series
    read back from Ray's Prometheus endpoint (--no-tour skips it)."""
    metrics_file: str | None = "out/metrics.prom"
    """Where the tour saves the metrics endpoint's text (Prometheus exposition format)."""
    runlog: str | None = "out/runlog.jsonl"
    """Run log of every request and of the drift watch's readings, for `dynray report` (a new one per run)."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1 image", got=self.limit, fix="e.g. --limit 300, or leave it out to send the whole split")
        if self.concurrency < 1:
            raise ConfigError("--concurrency must be at least 1", got=self.concurrency, fix="e.g. --concurrency 8")


@dataclass(frozen=True)
class Result:
    model: str
    router: str | None
    """The router that answered (from the responses)."""
    split: str
    requests: int
    answered: int
    stats: dict
    """dynray.bench.serve.summarise of the run: accuracy, cost, escalations, latency."""
    exit_mix: dict[int, float]
    status: dict[str, int]
    key_id: str | None = None
    """The API key the run created, used and revoked (None: the app had auth off)."""
    drift: dict | None = None
    """The drift watch after the split's traffic (``GET /v1/models``'s ``drift``), before the tour."""
    tour: TourResult | None = None
    runlog: str | None = None
    """The run log written (`dynray report --runlog` plots it)."""

    def summary(self) -> str:
        s, mix = self.stats, ", ".join(f"exit {k}: {v:.1%}" for k, v in self.exit_mix.items())
        auth = f" with API key {self.key_id} (made for the run, revoked after it)" if self.key_id else " (auth off)"
        out = (f"{self.answered}/{self.requests} answered over HTTP{auth} by router {self.router}, accuracy {s.get('accuracy', float('nan')):.4f}; {mix}\n"
               f"escalated to the cloud tier {s.get('escalated_frac', float('nan')):.1%}, degraded {s.get('degraded', 0)}; "
               f"latency p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms at concurrency {self.stats['concurrency']} ({s['rps']:.0f} req/s)")
        for v, d in ((self.drift or {}).get("versions") or {}).items():
            score = "-" if d.get("score") is None else f"{d['score']:.3f}"
            out += f"\ndrift watch on {v}: {d['status']}, score {score}" + (f" (alarms at {d['threshold']:.2f})" if d.get("threshold") else "")
        if self.tour is not None:
            out += "\noperations tour:\n" + "\n".join("  " + line for line in self.tour.summary().splitlines())
        if self.runlog:
            out += f"\nrun log: {self.runlog} (plot it: `dynray report --runlog {self.runlog}`)"
        return out


def run(cfg: Config) -> Result:
    from actors import serve_apps as D

    reg = ModelRegistry()
    info = reg.resolve(cfg.model)
    split = load_dataset(cfg.dataset or info.meta["dataset"], cfg.split)
    n = len(split) if cfg.limit is None else min(cfg.limit, len(split))
    images, labels = wire_images(split)[:n], split.labels.numpy()[:n]
    connect(log_to_driver=False)
    port = free_port()
    app_cfg = system_config(D.load_config(), "dynray", info.ref, str(reg.home), port, router=cfg.router)
    auth = AppArgs.model_validate(app_cfg["applications"][0]["args"]).auth.enabled
    key, key_id = None, None
    if auth:  # like any client: a key of its own, made for this run and revoked after it
        store = KeyStore.at_home(reg.home)
        key, rec = store.create("http-traffic", scopes=["predict"], rate_per_s=100_000, ttl_s=3600)
        key_id = rec.id
        log.info("created API key %s for this run (revoked when it ends)", key_id)
    try:
        D.deploy(app_cfg, timeout_s=180)
        bodies = [encode_array(images[i : i + 1], dtype="uint8") for i in range(len(images))]
        load = LoadConfig(url=f"http://127.0.0.1:{port}/dynray/v1/predict", requests=len(images), concurrency=cfg.concurrency, warmup=50, api_key=key)
        base = f"http://127.0.0.1:{port}/dynray"
        runlog = RunLog(cfg.runlog, fresh=True) if cfg.runlog else None

        def models() -> dict:
            return requests.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10).json()

        with DriftPoller(runlog, models) if runlog is not None else contextlib.nullcontext():
            res = run_load_sync(load, lambda i: bodies[i])
            if runlog is not None:
                runlog.requests(res.records, wall_s=res.wall_s, phase=f"{cfg.split} split")
            drift = models().get("drift")
            tour = None
            if cfg.tour and key is not None:
                escalated = [r.index for r in res.records if r.ok and "cloud" in (r.body or {}).get("tier", [])]
                hard = split.images[:n][escalated] if escalated else None
                tour = ops_tour.tour(base, "dynray", reg.home, key, split.images[:n], labels=split.labels[:n], hard=hard, metrics_file=cfg.metrics_file, runlog=runlog)
            elif cfg.tour:
                log.warning("the operations tour needs auth on (it probes keys and rate limits): skipped")
    finally:
        D.shutdown()
        if key_id is not None:
            store.revoke(key_id)
    ok = [r for r in res.records if r.ok]
    stats = {**summarise(res, labels, model=True), "concurrency": cfg.concurrency}
    return Result(model=info.ref, router=ok[0].body.get("router") if ok else None, split=f"{split.name}/{cfg.split}", requests=len(images),
                  answered=len(ok), stats=stats, exit_mix=exit_mix(res), status={str(k): v for k, v in res.status_counts().items()}, key_id=key_id,
                  drift=drift, tour=tour, runlog=cfg.runlog)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.http_traffic") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.http_traffic"))
