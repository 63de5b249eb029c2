"""Ray job: train a DynamicNet with Ray Train and register it.

    python -m jobs.train --dataset mnist-5k --epochs 20 --workers 2
    ray job submit --working-dir . -- python -m jobs.train --dataset mnist-5k
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from dynray.data import load_dataset
from dynray.finetune import FinetuneConfig
from dynray.store import load_model
from dynray.pipeline import train_and_register
from dynray.registry import ModelRegistry
from dynray.models.config import DynamicNetConfig
from dynray.models.moe import MoEConfig
from dynray.models.defaults import ARCHS, model_config_for
from dynray.training import TrainConfig
from jobs._ray import connect


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help="dataset name (default: %(default)s)")
    p.add_argument("--arch", default="dense", choices=ARCHS, help="dense DynamicNet, moe (last stage ends in an MoE block), or moe-dense (its dense twin at equal active MACs)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per-worker batch (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    p.add_argument("--distill", type=float, default=d.distill_alpha, help="self-distillation share (default: %(default)s)")
    p.add_argument("--schedule", default=d.schedule, choices=["linear", "cosine", "exponential"], help="annealing schedule")
    p.add_argument("--no-augment", action="store_true", help="disable random affine augmentation")
    p.add_argument("--name", default=None, help="registry name (default: dynnet-DATASET, moe-DATASET or moe-DATASET-dense)")
    m = model_config_for("mnist-5k", "moe").moe
    assert m is not None
    g = p.add_argument_group("mixture of experts (--arch moe)")
    g.add_argument("--experts", type=int, default=m.num_experts, help="routed experts per MoE block (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=m.top_k, help="routed experts per sample (default: %(default)s)")
    g.add_argument("--gate", default=m.gate, choices=["noisy_topk", "switch", "gshard"], help="gating (default: %(default)s)")
    g.add_argument("--shared-experts", type=int, default=m.shared_experts, help="always-on experts beside the routed ones (default: %(default)s)")
    g.add_argument("--groups", type=int, default=m.groups, help="expert groups; > 1 = hierarchical MoE (default: %(default)s)")
    g.add_argument("--capacity-factor", type=float, default=m.capacity_factor_train, help="expert capacity in training, x a uniform share (default: %(default)s)")
    g.add_argument("--eval-capacity-factor", type=float, default=m.capacity_factor_eval, help="expert capacity at evaluation and serving (default: %(default)s)")
    g.add_argument("--moe-stages", type=int, nargs="+", default=None, help="0-based stages that get an MoE block (default: the last)")


def _model_config(a: argparse.Namespace) -> DynamicNetConfig:
    arch = getattr(a, "arch", "dense")
    if arch == "dense":
        return model_config_for(a.dataset, "dense")
    cfg = model_config_for(a.dataset, "moe")
    assert cfg.moe is not None
    moe = replace(
        cfg.moe, num_experts=a.experts, top_k=a.top_k, gate=a.gate, groups=a.groups, shared_experts=a.shared_experts,
        capacity_factor_train=a.capacity_factor, capacity_factor_eval=a.eval_capacity_factor,
    )
    if a.moe_stages:  # explicit stages keep the dense layer counts
        cfg = replace(cfg, layers=model_config_for(a.dataset, "dense").layers)
        moe = replace(moe, stages=tuple(a.moe_stages))
    return replace(cfg, moe=moe.dense_equivalent() if arch == "moe-dense" else moe)


def default_name(dataset: str, arch: str) -> str:
    return {"dense": f"dynnet-{dataset}", "moe": f"moe-{dataset}", "moe-dense": f"moe-{dataset}-dense"}[arch]


def config_from_args(a: argparse.Namespace, finetune: FinetuneConfig | None = None) -> TrainConfig:
    return TrainConfig(
        dataset=a.dataset, model=_model_config(a), epochs=a.epochs, workers=a.workers, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
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
    name = a.name or (None if init_ref else default_name(cfg.dataset, getattr(a, "arch", "dense")))
    info, outcome = train_and_register(cfg, registry, name=name, parent=parent, init_state=init_state, val=val)
    return {"model": info.ref, "metrics": info.meta["metrics"], "seconds": outcome.seconds}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = main()
    print(f"registered {r['model']}: val accuracy per exit {[round(a, 4) for a in r['metrics']['val_exit_accuracy']]} ({r['seconds']:.0f}s)")
    sys.exit(0)
