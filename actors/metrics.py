"""The :class:`~dynray.serving.metrics.MetricsSink` of every replica, on ``ray.util.metrics``.

One :class:`RaySink` per process builds each series of :data:`dynray.serving.metrics.SPECS`
once, with a ``node`` tag (this Ray node's id, first 12 hex digits) set as a default on all
of them, so a dashboard can split any series by node. Ray exports them on each node's
metrics agent (``ray_<name>``); a recording costs a few microseconds and never blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import ray
from ray.util.metrics import Counter, Gauge, Histogram

from dynray.serving import metrics as M

__all__ = ["RaySink", "node_tag"]

log = logging.getLogger(__name__)


def node_tag() -> str:
    """This process's Ray node id, shortened (``local`` outside Ray)."""
    try:
        return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - not connected to Ray (a unit test)
        return "local"


class RaySink:
    """Records into Ray's metrics; unknown names and tag sets raise, as Ray's own checks do."""

    def __init__(self, node: str | None = None) -> None:
        self.node = node or node_tag()
        self._m: dict[str, Counter | Gauge | Histogram] = {}
        for name, s in M.SPECS.items():
            keys = (*s.tags, M.TAG_NODE)
            if s.kind == "counter":
                m = Counter(name, description=s.description, tag_keys=keys)
            elif s.kind == "gauge":
                m = Gauge(name, description=s.description, tag_keys=keys)
            else:
                m = Histogram(name, description=s.description, boundaries=list(s.boundaries), tag_keys=keys)
            m.set_default_tags({M.TAG_NODE: self.node})
            self._m[name] = m

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        self._m[name].inc(value, tags=dict(tags) if tags else None)  # type: ignore[union-attr]

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._m[name].observe(value, tags=dict(tags) if tags else None)  # type: ignore[union-attr]

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._m[name].set(value, tags=dict(tags) if tags else None)  # type: ignore[union-attr]
