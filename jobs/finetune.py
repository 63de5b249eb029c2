"""Ray job: fine-tune a registered model (freeze, unfreeze the last N stages, gradual unfreezing, split LRs).

    python -m jobs.finetune --model dynnet-mnist-5k:v2 --epochs 5 --gradual
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from dynray.finetune import FinetuneConfig
from dynray.flags import guarded, parse, setup_logging
from jobs import train

__all__ = ["Config", "run", "main"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """Fine-tune a registered model and register the result as its child."""

    model: str
    """Model ref to start from (its architecture is kept)."""
    train: Annotated[train.Config, tyro.conf.OmitArgPrefixes] = field(default_factory=lambda: train.Config(epochs=5))
    """Training run (the model's own architecture is used; --arch and the MoE flags are ignored)."""
    finetune: Annotated[FinetuneConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=FinetuneConfig)
    """What trains, and at which learning rates."""


def run(cfg: Config) -> train.Result:
    return train.run(cfg.train, finetune=cfg.finetune, init_ref=cfg.model)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.finetune") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.finetune"))
