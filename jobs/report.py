"""Job: PNG plots of a serving or bench run from its run log (:mod:`dynray.runlog`).

    python -m jobs.report --runlog out/runlog.jsonl --out out/report
    dynray report --runlog out/runlog.jsonl

Writes ``exit_mix.png``, ``latency_tiers.png`` and ``drift.png`` (:mod:`dynray.report`).
`dynray demo` leaves ``out/runlog.jsonl``: its HTTP traffic and operations tour (the
inverted digits raise the drift alarm); `dynray bench drift` writes one beside its JSON.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from dynray.flags import guarded, parse, setup_logging
from dynray.report import Report, write_report
from dynray.runlog import read_runlog

__all__ = ["Config", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Plot the exit mix over time, latency percentiles per tier and the drift score of a run."""

    runlog: str = "out/runlog.jsonl"
    """The run log (JSON lines) a demo, traffic or drift bench run wrote."""
    out: str = "out/report"
    """Directory for the PNG files."""


def run(cfg: Config) -> Report:
    return write_report(read_runlog(cfg.runlog), cfg.out)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.report") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.report"))
