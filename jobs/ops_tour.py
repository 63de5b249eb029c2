"""The demo's operations tour: the live service's defences and failover, each exercised for real,
then every ``dynray_*`` series read back from Ray's Prometheus endpoint.

Run by ``jobs.http_traffic`` (the demo's last step) on the app it deployed:

1. a request with no API key (401) and a key sent over its rate (429);
2. a client whose queries are small perturbations of its own earlier ones, the query pattern
   of Jacobian-based model extraction (flagged by the extraction detector; action: log);
3. labels sent back (``POST /v1/feedback``) for hybrid-routed answers: the live accuracy per
   exit and the hybrid's learnt trust in its policy;
4. the cloud replica killed under load (``jobs.serve_chaos``): every request still answered,
   the hard ones degraded to an edge exit until the replacement is up;
5. a stream of inverted digits: the drift watch raises its alarm (or keeps the one the
   perturbed and hard digits before it raised: an alarm is one episode);
6. the node's metrics endpoint, scraped until every series of the graph is non-zero (Ray
   reports every 10 s by default), parsed with ``prometheus_client`` and saved as text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import requests
import torch

from dynray.bench.load import LoadConfig, run_load_sync
from dynray.runlog import RunLog
from dynray.security.keys import KeyStore
from dynray.serving import metrics as M
from dynray.serving.payload import encode_array
from dynray.serving.prometheus import nonzero, parse, required_missing, scrape
from jobs.serve_chaos import ChaosConfig, kill_devices_under_load

__all__ = ["TourResult", "REQUIRED", "tour"]

log = logging.getLogger(__name__)
REQUIRED: tuple[str, ...] = tuple(n for n in M.SPECS if n not in (M.EXPERT_TOKENS, M.FAILOVERS, M.ERRORS))
"""Series the tour makes non-zero: all but the remote experts' (the demo's graph runs none)
and the 5xx/503 counters (nothing in the tour takes every tier down)."""


@dataclass(frozen=True)
class TourResult:
    statuses: dict[str, int]
    """First status of each probe: no_key, over_rate (the last of a quick burst)."""
    rate_limited: int
    flags: int
    """Extraction flags the ingress replica that answered /v1/admin/security raised."""
    chaos: dict
    drift_alarms: float
    feedback: dict = field(default_factory=dict)
    """The labels step: requests and samples labelled, accuracy, live accuracy per exit, rl_weight first and last."""
    series: dict[str, float] = field(default_factory=dict)
    """dynray series -> non-zero total on the metrics endpoint."""
    missing: list[str] = field(default_factory=list)
    metrics_file: str | None = None

    def summary(self) -> str:
        c = self.chaos
        lines = [
            f"no key: {self.statuses['no_key']}; a 1/s key sent 6 at once: {self.rate_limited} answered 429",
            f"extraction-style client: {self.flags} flag(s) raised (action: log)",
            *([f"labels sent back for {self.feedback['samples']} hybrid-routed answers: {100 * self.feedback['accuracy']:.1f}% right; live accuracy per exit "
               + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(self.feedback["live_accuracy"].items())) + f"; hybrid rl_weight {self.feedback['rl_weight'][0]:.2f} -> {self.feedback['rl_weight'][-1]:.2f}"]
              if self.feedback.get("samples") else []),
            f"cloud replica killed under load: {c['answered']}/{c['requests']} answered, {c['degraded']} degraded, replaced in {c['recovery_s']:.1f} s",
            f"drift alarms raised during the tour: {self.drift_alarms:.0f} (an alarm is one episode per ingress replica: perturbed, hard and inverted digits in turn)",
            f"metrics: {len(self.series)} dynray series non-zero on Ray's Prometheus endpoint" + (f"; missing: {', '.join(self.missing)}" if self.missing else " (all of them)")
            + (f"; saved to {self.metrics_file}" if self.metrics_file else ""),
        ]
        return "\n".join(lines)


def _post(url: str, body: dict, key: str | None) -> requests.Response:
    return requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def _load(url: str, key: str, bodies: list[dict], runlog: RunLog | None, phase: str, concurrency: int = 4) -> None:
    res = run_load_sync(LoadConfig(url=url, requests=len(bodies), concurrency=concurrency, api_key=key), lambda i: bodies[i])
    if res.errors:
        log.warning("tour load (%s): %s", phase, res.status_counts())
    if runlog is not None:
        runlog.requests(res.records, wall_s=res.wall_s, phase=phase)


def _labels(base_url: str, key: str, images: torch.Tensor, labels: torch.Tensor, *, requests_n: int = 30, batch: int = 8) -> dict:
    """Hybrid-routed predictions, each followed by its true labels (POST /v1/feedback)."""
    right = total = 0
    weights, live = [], {}
    for i in range(requests_n):
        idx = [(i * batch + j) % len(images) for j in range(batch)]
        rid = f"tour-label-{i}-{time.time_ns()}"
        r = requests.post(f"{base_url}/v1/predict", json={**encode_array(images[idx]), "router": "hybrid"},
                          headers={"Authorization": f"Bearer {key}", "X-Request-Id": rid}, timeout=30)
        if r.status_code != 200:
            continue
        f = requests.post(f"{base_url}/v1/feedback", json={"request_id": rid, "labels": labels[idx].tolist()}, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        if f.status_code != 200:
            log.warning("feedback answered %d: %s", f.status_code, f.text[:200])
            continue
        body = f.json()
        right, total = right + sum(body["correct"]), total + len(body["correct"])
        live.update(body["live_accuracy"])
        if body["rl_weight"] is not None:
            weights.append(body["rl_weight"])
    return {"requests": requests_n, "samples": total, "accuracy": right / max(total, 1), "live_accuracy": live, "rl_weight": weights or [float("nan")]}


def tour(base_url: str, app: str, home: str | Path, key: str, images: torch.Tensor, *, labels: torch.Tensor | None = None, hard: torch.Tensor | None = None,
         metrics_file: str | Path | None = None, runlog: RunLog | None = None, scrape_timeout_s: float = 60.0) -> TourResult:
    """Run the tour against the app at ``base_url`` (``http://host:port/<app>``); ``key``: a predict key.
    ``labels``: the true classes of ``images`` (the labels step sends them back; None: skip it).
    ``hard``: images the service escalated to the cloud before (the chaos step sends them, so
    the cloud's absence shows as degraded answers; default: digits turned 90 degrees, which
    the edge is rarely sure of). ``runlog``: where the tour's requests are logged."""
    url = f"{base_url}/v1/predict"
    store = KeyStore.at_home(home)
    one = encode_array(images[:1])
    statuses = {"no_key": _post(url, one, None).status_code}
    slow, slow_rec = store.create("tour-slow", rate_per_s=1, burst=2, ttl_s=3600)
    burst = [_post(url, one, slow).status_code for _ in range(6)]
    rate_limited = burst.count(429)
    statuses["over_rate"] = burst[-1]
    # base images, each followed by 3 perturbations of it in a random sign direction (Papernot-style lambda 0.1)
    x = images[:60]
    g = torch.Generator().manual_seed(0)
    bodies = [encode_array((b + 0.1 * torch.sign(torch.randn(b.shape, generator=g)) * (j > 0)).clamp(0, 1)[None]) for b in x for j in range(4)]
    probe, probe_rec = store.create("tour-extraction", rate_per_s=1000, ttl_s=3600)
    admin, admin_rec = store.create("tour-admin", scopes=["admin"], ttl_s=3600)
    try:
        _load(url, probe, bodies, runlog, "extraction-style")
        flags = len(requests.get(f"{base_url}/v1/admin/security", headers={"Authorization": f"Bearer {admin}"}, timeout=10).json().get("flags", []))
        feedback = _labels(base_url, key, images, labels) if labels is not None else {}
        if hard is None or len(hard) < 3:
            hard = torch.rot90(images[:64], 1, dims=(2, 3))
        chaos = kill_devices_under_load(ChaosConfig(url=url, app=app, requests=300, concurrency=8, kill_after_s=1.0, recovery_timeout_s=60, api_key=key),
                                        hard.numpy().astype(np.float32), deployments=("Cloud",)).to_dict()
        _load(url, key, [encode_array(1.0 - images[i % len(images)][None]) for i in range(300)], runlog, "inverted digits")
    finally:
        for rec in (slow_rec, probe_rec, admin_rec):
            store.revoke(rec.id)
    port = ray.nodes()[0]["MetricsExportPort"]
    t0 = time.monotonic()
    while True:
        text = scrape(port)
        fams = parse(text)
        missing = required_missing(fams, REQUIRED)
        if not missing or time.monotonic() - t0 > scrape_timeout_s:
            break
        time.sleep(2.0)
    if metrics_file is not None:
        Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_file).write_text(text)
    series = nonzero(fams)
    return TourResult(statuses=statuses, rate_limited=rate_limited, flags=flags, chaos=chaos, drift_alarms=series.get(M.DRIFT_ALARMS, 0.0), feedback=feedback,
                      series=series, missing=missing, metrics_file=str(metrics_file) if metrics_file else None)
