"""Connecting a job to Ray: attach when submitted, else start a private local instance."""

from __future__ import annotations

import os
import socket

import ray

__all__ = ["connect", "free_port"]


def connect(num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Attach to ``RAY_ADDRESS`` (set inside `ray job submit`), else start a local Ray.

    ``address="local"`` ignores stale ``ray_current_cluster`` files (see RAY_NOTES §0). The
    dashboard stays on: Ray Train's placement-group cleaner polls the State API, which needs it.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
    else:
        # this one node stands in for both device tiers: it offers the `edge` and `cloud`
        # resources the Serve tiers are placed by (a real cluster has node types for them)
        ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 2), resources={"edge": 16, "cloud": 16}, include_dashboard=True, log_to_driver=log_to_driver, logging_level="WARNING")


def free_port() -> int:
    """A TCP port nothing listens on now (for a Serve HTTP port or a private Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
