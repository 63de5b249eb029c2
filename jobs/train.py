"""Ray job: train a DynamicNet with Ray Train and register it.

    python -m jobs.train --dataset mnist-5k --epochs 20 --workers 2
    ray job submit --working-dir . -- python -m jobs.train --dataset mnist-5k
"""

from __future__ import annotations

import argparse
import logging
import sys

from dynray.data import load_dataset
from dynray.finetune import FinetuneConfig
from dynray.store import load_model
from dynray.pipeline import train_and_register
from dynray.registry import ModelRegistry
from dynray.training import TrainConfig
from jobs._ray import connect


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help="dataset name (default: %(default)s)")
    p.add_argument("--arch", default="dense", choices=["dense"], help="architecture family (MoE lands with its issue)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per-worker batch (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    p.add_argument("--distill", type=float, default=d.distill_alpha, help="self-distillation share (default: %(default)s)")
    p.add_argument("--schedule", default=d.schedule, choices=["linear", "cosine", "exponential"], help="annealing schedule")
    p.add_argument("--no-augment", action="store_true", help="disable random affine augmentation")
    p.add_argument("--name", default=None, help="registry name (default: dynnet-DATASET)")


def config_from_args(a: argparse.Namespace, finetune: FinetuneConfig | None = None) -> TrainConfig:
    return TrainConfig(
        dataset=a.dataset, epochs=a.epochs, workers=a.workers, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
        distill_alpha=a.distill, schedule=a.schedule, augment=not a.no_augment, finetune=finetune,
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    add_train_args(p)
    return run(p.parse_args(argv))


def run(a: argparse.Namespace, *, finetune: FinetuneConfig | None = None, init_ref: str | None = None) -> dict:
    cfg = config_from_args(a, finetune)
    registry = ModelRegistry()
    init_state = parent = None
    if init_ref is not None:  # fine-tuning starts from a registered model
        stored = load_model(registry, init_ref)
        init_state, parent = stored.model.state_dict(), stored.info.ref
        cfg = TrainConfig(**{**cfg.__dict__, "model": stored.model.cfg})
    val = load_dataset(cfg.dataset, "val", root=cfg.data_root)  # missing files: one clear error before Ray starts
    connect(num_cpus=max(2, cfg.workers))
    info, outcome = train_and_register(cfg, registry, name=a.name, parent=parent, init_state=init_state, val=val)
    return {"model": info.ref, "metrics": info.meta["metrics"], "seconds": outcome.seconds}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = main()
    print(f"registered {r['model']}: val accuracy per exit {[round(a, 4) for a in r['metrics']['val_exit_accuracy']]} ({r['seconds']:.0f}s)")
    sys.exit(0)
