"""Reading Ray's Prometheus endpoint, and checking a Grafana dashboard against it.

:func:`scrape` fetches a node's ``/metrics`` text and parses it with ``prometheus_client``'s
own parser (never by string matching); :func:`dynray_series` keeps the dynray families.
:func:`dashboard_series` lists the series and labels every query of a Grafana dashboard
JSON uses, so a test can check each against a live scrape and against
:data:`dynray.serving.metrics.SPECS`.
"""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dynray.errors import ConfigError
from dynray.serving import metrics as M

__all__ = ["Family", "parse", "scrape", "dynray_series", "nonzero", "required_missing", "DashboardQuery", "dashboard_series", "SUFFIXES"]

SUFFIXES = ("_bucket", "_count", "_sum", "_total")
_SERIES = re.compile(r"\bray_dynray_[a-z0-9_]+")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")


@dataclass(frozen=True)
class Family:
    """One parsed metric family: its type and samples as (sample name, labels, value)."""

    name: str
    type: str
    samples: tuple[tuple[str, dict[str, str], float], ...]

    def total(self) -> float:
        """Counters: the sum over series; histograms: the observation count; gauges: the largest value."""
        if self.type == "histogram":
            return sum(v for n, _, v in self.samples if n.endswith("_count"))
        if self.type == "gauge":
            return max((v for _, _, v in self.samples), default=0.0)
        return sum(v for n, _, v in self.samples if not n.endswith("_created"))

    def labels(self) -> set[str]:
        return {k for _, lab, _ in self.samples for k in lab}


def parse(text: str) -> dict[str, Family]:
    """Prometheus text exposition -> families by name (``prometheus_client``'s parser)."""
    return {f.name: Family(f.name, f.type, tuple((s.name, dict(s.labels), float(s.value)) for s in f.samples)) for f in text_string_to_metric_families(text)}


def scrape(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> str:
    """The raw text of a node's metrics endpoint (Ray's ``MetricsExportPort``; no token needed)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as r:
        return r.read().decode()


def dynray_series(families: dict[str, Family]) -> dict[str, Family]:
    """The dynray families, keyed by the name in :data:`~dynray.serving.metrics.SPECS`."""
    by_export = {M.exported_name(n): n for n in M.SPECS}
    return {by_export[name]: f for name, f in families.items() if name in by_export}


def nonzero(families: dict[str, Family]) -> dict[str, float]:
    """dynray series name -> its total (see :meth:`Family.total`), for series with a total > 0."""
    return {n: f.total() for n, f in dynray_series(families).items() if f.total() > 0}


def required_missing(families: dict[str, Family], required: list[str] | tuple[str, ...]) -> list[str]:
    """The ``required`` dynray series that are absent or all zero."""
    have = nonzero(families)
    return [n for n in required if n not in have]


@dataclass(frozen=True)
class DashboardQuery:
    panel: str
    expr: str
    series: tuple[str, ...]
    """Sample names the query reads (``ray_dynray_…``, with any ``_bucket``/``_sum``/``_count``)."""
    labels: tuple[str, ...]
    """Labels its ``by (...)`` clauses group on."""

    def families(self) -> set[str]:
        """Family names, as :func:`parse` keys them (suffixes stripped)."""
        out = set()
        for s in self.series:
            for suf in SUFFIXES:
                if s.endswith(suf):
                    s = s[: -len(suf)]
                    break
            out.add(s)
        return out


def dashboard_series(path: str | Path) -> list[DashboardQuery]:
    """Every Prometheus query of a Grafana dashboard JSON, with the series and labels it uses."""
    try:
        dash = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("cannot read the dashboard", got=str(path), fix=f"a Grafana dashboard JSON file ({e})") from None
    out = []
    panels = list(dash.get("panels", []))
    while panels:
        p = panels.pop(0)
        panels += p.get("panels", [])  # rows nest panels
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            labels = {lab.strip() for grp in _BY.findall(expr) for lab in grp.split(",") if lab.strip()}
            out.append(DashboardQuery(p.get("title", ""), expr, tuple(sorted(set(_SERIES.findall(expr)))), tuple(sorted(labels))))
    return out
