"""Every measurement dynray reports, and the one bench JSON file they are merged into.

Modules, one section each: :mod:`~dynray.bench.core` (accuracy, MACs, latency of the
adaptive network), :mod:`~dynray.bench.moe`, :mod:`~dynray.bench.router` (with
:mod:`~dynray.bench.curves` and :mod:`~dynray.bench.trace`), :mod:`~dynray.bench.nas`
(the search report), :mod:`~dynray.bench.serve` (HTTP measurement and its summary),
:mod:`~dynray.bench.cluster` (node and replica scaling from a sampled timeline),
:mod:`~dynray.bench.security` (detectors; :mod:`~dynray.bench.fuzz` fuzzes the ingress),
:mod:`~dynray.bench.drift` (the drift streams and their offline replay), :mod:`~dynray.bench.calibration`
(the ablation of the calibrator's rule families);
:mod:`~dynray.bench.load` generates HTTP load and :mod:`~dynray.bench.report` prints every
section. The drivers that need a live cluster (deploying apps, chaos, autoscaling) are the
``jobs/bench*.py`` jobs, which call into these modules.

The bench JSON is written only through :func:`merge_section`: it is locked against
concurrent writers, replaced atomically, and checked with :func:`check_bench_file` before a
benchmark starts, so a corrupt file is refused before minutes of measurement, not after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dynray.errors import ConfigError
from dynray.fileio import locked, write_atomic

__all__ = ["SECTIONS", "BUILT_SECTIONS", "BenchTarget", "BenchResult", "check_bench_file", "merge_section"]

SECTIONS = ("core", "serve", "router", "moe", "nas", "cluster", "security", "compress", "gan", "federated", "drift", "calibration")
"""Every section of the bench JSON contract (DESIGN.md §4); later issues build the rest."""
BUILT_SECTIONS = ("core", "serve", "router", "moe", "nas", "cluster", "security", "drift", "compress", "gan", "federated", "calibration")
"""The sections `dynray bench` can measure today."""


@dataclass(frozen=True, kw_only=True)
class BenchTarget:
    """What every bench section measures and where it writes (the flags all sections share)."""

    json: str
    """Bench JSON file to write, or merge the section into."""
    model: str | None = None
    """Model ref (name, name:vN, production, staging); default: production, else the newest."""
    dataset: str | None = None
    """Dataset to measure on; default: the model's own."""
    plot: str | None = None
    """PNG path of the section's plot; default: next to the JSON file."""


@dataclass(frozen=True)
class BenchResult:
    """One measured section, as merged into the bench JSON file."""

    section: str
    """Section name (a key of the bench JSON)."""
    data: dict
    """The section's measurements."""
    json: str
    """The file it was merged into."""

    def summary(self) -> str:
        from dynray.bench.report import format_section

        return f"wrote section '{self.section}' to {self.json}\n" + format_section(self.section, self.data)


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("bench JSON file is not valid JSON", got=f"{path}: {e}", fix="delete it or pass another --json path") from None
    except OSError as e:
        raise ConfigError("bench JSON file cannot be read", got=f"{path}: {e.strerror}", fix="check its permissions or pass another --json path") from None
    if not isinstance(doc, dict):
        raise ConfigError("bench JSON file does not hold an object of sections", got=f"{path}: {type(doc).__name__}", fix="delete it or pass another --json path")
    return doc


def check_bench_file(path: str | Path) -> Path:
    """Refuse, before any measuring, a bench file that could not be merged into afterwards."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("--json names a directory", got=str(path), fix="pass a file path such as out/bench.json")
    if path.exists():
        _read(path)
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError("the bench JSON file's folder is not a directory", got=str(existing), fix="pass a path under a directory")
    return path


def merge_section(path: str | Path, section: str, data: dict) -> dict:
    """Write or merge one section into the bench JSON file (locked, atomic replace)."""
    if section not in SECTIONS:
        raise ConfigError("unknown bench section", got=section, fix=f"one of {', '.join(SECTIONS)}")
    path = Path(path)
    with locked(path):
        doc = _read(path) if path.exists() else {}
        doc[section] = data
        write_atomic(path, json.dumps(doc, indent=2, default=str))
    return doc
