"""Ray job: cache a model's exit outputs on its splits (the router's training and bench data).

    python -m jobs.router_cache --model production --split train+val+test
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from dynray.errors import ConfigError
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import ModelRegistry
from dynray.routing.cache import SPLITS, write_exit_cache
from dynray.store import load_model

__all__ = ["Config", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Run every exit of a model on its splits once and cache the outputs."""

    model: str | None = None
    """Model ref (default: production, else the newest)."""
    split: str = "train+val+test"
    """Splits to cache, joined by +."""

    def __post_init__(self) -> None:
        parts = self.split.split("+")
        if not all(p in SPLITS for p in parts):
            raise ConfigError("unknown split in --split", got=self.split, fix=f"join splits of {', '.join(SPLITS)} with +")


def run(cfg: Config) -> list[str]:
    """The cache files written, one per split."""
    reg = ModelRegistry()
    stored = load_model(reg, cfg.model)
    return [str(write_exit_cache(reg, stored, s)) for s in cfg.split.split("+")]


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.router_cache") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    for path in run(cfg):
        print(f"cached exit outputs: {path}", flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.router_cache"))
