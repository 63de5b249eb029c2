"""Shared fixtures: tiny models and cached records for unit tests, one Ray for the session."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dynray.data import load_dataset
from dynray.models import DynamicNetConfig, build


@pytest.fixture(scope="session")
def mnist5k():
    """The three mnist-5k splits, loaded once per session."""
    return {s: load_dataset("mnist-5k", s) for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def trained_net(mnist5k) -> torch.nn.Module:
    """A default DynamicNet trained for 4 epochs on mnist-5k in process (about 8 s), shared by
    the tests that need a model that really classifies (attacks, detectors, drift)."""
    from dynray.security.anomaly import train_audit_model

    torch.manual_seed(0)
    return train_audit_model(mnist5k["train"].images, mnist5k["train"].labels, 10, epochs=4, seed=0)


@pytest.fixture
def tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8)).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny batches gain nothing from intra-op threads, and on a busy 2-core machine the
    thread pool's contention made such modules 5x slower; the setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test under tests/ray (RAY_NOTES §10)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # edge/cloud resources so the serving tiers can be placed (one node stands in for both)
    # metrics reported every second (default 10 s), so the metrics test reads them promptly
    ray.init(address="local", num_cpus=16, resources={"edge": 16, "cloud": 16}, include_dashboard=True, log_to_driver=False, logging_level="ERROR",
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


def _clean_env(home: Path) -> dict[str, str]:
    return {"HOME": os.environ.get("HOME", "/root"), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "DYNRAY_HOME": str(home), "DYNRAY_DATA": str(home / "data"), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def clean_env() -> Callable[[Path], dict[str, str]]:
    """``env -i HOME=$HOME PATH=<venv>/bin:/usr/bin:/bin`` plus a test registry: a new user's
    shell, with no RAY_* or other variables, for every CLI subprocess."""
    return _clean_env
