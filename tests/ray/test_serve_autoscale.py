"""Serve replica autoscaling of the edge tier: a replica is added under load, and removed after it.

Its own app (the edge starts at 1 replica, may grow to 2) with the autoscaler's delays made
short through the tier's args (``upscale_delay_s``, ``downscale_delay_s``, ...), so the whole
cycle takes seconds rather than the production defaults' half minute.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dynray.bench.load import LoadConfig, run_load_sync
from dynray.data import load_dataset
from dynray.models import DynamicNetConfig, build
from dynray.registry import ModelRegistry
from dynray.serving.payload import encode_array
from dynray.store import save_model
from dynray.thresholds import ThresholdRule
from jobs._ray import free_port

pytestmark = pytest.mark.ray
APP = "dynray"


@pytest.fixture(scope="module")
def autoscaled(ray_session, tmp_path_factory):
    from actors import serve_apps as D

    home = tmp_path_factory.mktemp("autoscale-home")
    torch.manual_seed(0)
    model = build(DynamicNetConfig(widths=(8, 8, 16), layers=(1, 1, 1), exit_hidden=16)).eval()
    train = load_dataset("mnist-5k", "train").images
    model.complexity.fit(train[:512])
    ref = save_model(ModelRegistry(home), "auto", model, dataset="mnist-5k", rule=ThresholdRule(thresholds=(0.9, 0.9)), metrics={}).ref
    port = free_port()
    cfg = D.load_config()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    app = cfg["applications"][0]
    fast = {"target_ongoing_requests": 0.25, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
    app["args"].update(home=str(home), models=[ref], auth={"enabled": False}, ingress={**app["args"]["ingress"], "replicas": 1}, scheduling={"policy": "cost"},
                       edge={**app["args"]["edge"], "min_replicas": 1, "max_replicas": 2, **fast},
                       cloud={**app["args"]["cloud"], "min_replicas": 1, "max_replicas": 1})
    for d in app["deployments"]:
        d["user_config"] = {**d["user_config"], "models": [ref], "home": str(home)}
    D.deploy(cfg, timeout_s=180)
    yield {"url": f"http://127.0.0.1:{port}/v1/predict"}
    D.shutdown()


def _edge_running() -> int:
    from actors.serve_apps import app_status

    return app_status(APP)["deployments"]["Edge"]["replicas"].get("RUNNING", 0)


def test_edge_tier_scales_up_under_load_and_back_down_after(autoscaled):
    x = load_dataset("mnist-5k", "test").images[:64]
    bodies = [encode_array(x[i : i + 1], dtype="uint8") for i in range(64)]
    assert _edge_running() == 1
    stop, errors = threading.Event(), []

    def load() -> None:
        while not stop.is_set():  # closed loop at concurrency 16 until told to stop
            res = run_load_sync(LoadConfig(url=autoscaled["url"], requests=96, concurrency=16, timeout_s=30), lambda i: bodies[i % 64])
            errors.append(res.errors)

    t = threading.Thread(target=load, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        while _edge_running() < 2 and time.monotonic() - t0 < 40:
            time.sleep(0.25)
        up_s = time.monotonic() - t0
    finally:
        stop.set()
        t.join(timeout=60)
    assert _edge_running() == 2, f"no second edge replica after {up_s:.0f} s of load"
    stopped = time.monotonic()
    while _edge_running() > 1 and time.monotonic() - stopped < 30:
        time.sleep(0.25)
    down_s = time.monotonic() - stopped
    print(f"autoscale: up after {up_s:.1f} s of load, back to 1 replica {down_s:.1f} s after it stopped")
    assert _edge_running() == 1, f"still {_edge_running()} edge replicas {down_s:.0f} s after the load stopped"
    assert sum(errors) == 0, errors
