"""HTTP measurement of a served system: drive it with closed-loop load, summarise the answers.

Shared by the serving benchmark (``jobs/bench_serve.py``), the demo's traffic step
(``jobs/http_traffic.py``) and the serving chaos drivers. One test image per request, sent
as ``array_b64`` uint8 (DESIGN.md §4: JSON-parsing 784 floats costs more than the model).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from dynray.bench.load import LoadConfig, LoadResult, run_load_sync
from dynray.data import Split
from dynray.serving.payload import encode_array

__all__ = ["wire_images", "measure", "summarise", "exit_mix"]


def wire_images(split: Split) -> np.ndarray:
    """The split's images as the uint8 wire form carries them ([N, C, H, W] floats in [0, 1])."""
    return np.clip(np.rint(split.images.numpy() * 255), 0, 255).astype(np.uint8) / 255.0


def measure(url: str, images: np.ndarray, *, requests: int, concurrency: int, warmup: int, timeout_s: float = 30.0) -> LoadResult:
    """``requests`` POSTs of one image each (cycling over ``images``) at fixed concurrency."""
    n = len(images)
    bodies = [encode_array(images[i : i + 1], dtype="uint8") for i in range(n)]
    cfg = LoadConfig(url=url, requests=requests, concurrency=concurrency, warmup=warmup, timeout_s=timeout_s)
    return run_load_sync(cfg, lambda i: bodies[i % n])


def summarise(res: LoadResult, labels: np.ndarray, *, model: bool) -> dict:
    """Throughput and latency; with ``model``, also accuracy, cost, escalations and degradations."""
    s = {"rps": round(res.rps, 1), "p50_ms": round(res.p50_ms, 2), "p99_ms": round(res.p99_ms, 2), "errors": res.errors}
    if not model:
        return s
    ok = [r for r in res.records if r.ok]
    if not ok:
        return {**s, "answered": 0}
    n = len(labels)
    s["answered"] = len(ok)
    s["accuracy"] = round(float(np.mean([r.body["predictions"][0] == labels[r.index % n] for r in ok])), 4)
    s["cost_per_1k"] = round(1000 * float(np.mean([r.body["cost"] for r in ok])), 2)
    s["escalated_frac"] = round(float(np.mean([t == "cloud" for r in ok for t in r.body["tier"]])), 4)
    s["degraded"] = sum(bool(r.body["degraded"]) for r in ok)
    s["mean_macs"] = round(float(np.mean([r.body["macs"][0] for r in ok])), 1)
    return s


def exit_mix(res: LoadResult) -> dict[int, float]:
    """Share of answered requests per exit (first sample of each request)."""
    ok = [r for r in res.records if r.ok]
    exits = Counter(r.body["exit"][0] for r in ok)
    return {int(k): round(v / max(len(ok), 1), 4) for k, v in sorted(exits.items())}
