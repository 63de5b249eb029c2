"""Ray job: train a DynamicNet with Ray Train and register it.

    python -m jobs.train --dataset mnist-5k --epochs 20 --workers 2
    python -m jobs.train --audit-data --audit-action drop    # leave out what the poisoning audit flags
    dynray submit train -- --dataset mnist-5k
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import tyro

from dynray.data import Split, load_dataset
from dynray.finetune import FinetuneConfig
from dynray.flags import guarded, parse, setup_logging
from dynray.errors import ConfigError, RegistryError, UnknownNameError
from dynray.models.config import DynamicNetConfig, config_from_dict
from dynray.models.defaults import model_config_for
from dynray.models.moe import MoEConfig
from dynray.pipeline import train_and_register
from dynray.store import load_model
from dynray.training import TrainConfig
from jobs._ray import connect, job_registry

__all__ = ["MoEFlags", "Config", "Result", "run", "main", "default_name", "audit_training_split", "synthetic_images"]

log = logging.getLogger(__name__)
_T = TrainConfig  # defaults come from the library's configs: one source for each value
_M: MoEConfig = model_config_for("mnist-5k", "moe").moe  # type: ignore[assignment]  # the --arch moe default


@dataclass(frozen=True, kw_only=True)
class MoEFlags:
    """Mixture of experts (with --arch moe)."""

    experts: int = _M.num_experts
    """Routed experts per MoE block."""
    top_k: int = _M.top_k
    """Routed experts per sample."""
    gate: Literal["noisy_topk", "switch", "gshard"] = _M.gate  # type: ignore[assignment]
    """Gating."""
    shared_experts: int = _M.shared_experts
    """Always-on experts beside the routed ones."""
    groups: int = _M.groups
    """Expert groups; > 1 = hierarchical MoE."""
    capacity_factor: float = _M.capacity_factor_train
    """Expert capacity in training, times a uniform share."""
    eval_capacity_factor: float = _M.capacity_factor_eval
    """Expert capacity at evaluation and serving."""
    moe_stages: tuple[int, ...] | None = None
    """0-based stages that get an MoE block (default: the last)."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """Train a DynamicNet with Ray Train and register it."""

    dataset: str = _T.dataset
    """Dataset name."""
    arch: Literal["dense", "moe", "moe-dense"] = "dense"
    """dense DynamicNet, moe (last stage ends in an MoE block), or moe-dense (its dense twin at equal active MACs)."""
    epochs: int = _T.epochs
    """Passes over the training split."""
    workers: int = _T.workers
    """Ray Train workers (data-parallel replicas, 1 CPU each)."""
    batch_size: int = _T.batch_size
    """Samples per worker per step."""
    lr: float = _T.lr
    """Peak learning rate."""
    seed: int = _T.seed
    """Seeds the model init, the data order and the augmentation."""
    distill: float = _T.distill_alpha
    """Self-distillation share of the early exits' loss (0 disables it)."""
    schedule: Literal["linear", "cosine", "exponential"] = "cosine"
    """Annealing schedule of the exit loss weights and the monitoring threshold."""
    augment: bool = _T.augment
    """Random affine augmentation (--no-augment disables it)."""
    name: str | None = None
    """Registry name (default: dynnet-DATASET, moe-DATASET or moe-DATASET-dense)."""
    arch_from: str | None = None
    """Train the architecture of this registered model from scratch (e.g. a NAS front member,
    nas-mnist-5k:v3) instead of --arch's default; its weights are not used."""
    moe: Annotated[MoEFlags, tyro.conf.OmitArgPrefixes] = field(default_factory=MoEFlags)
    """Mixture of experts (with --arch moe)."""
    audit_data: bool = False
    """Before training, audit the training split for poisoning: out-of-fold label audit
    (flipped labels) and activation clustering (backdoor triggers); the flags are logged and
    written to $DYNRAY_HOME/audits/."""
    audit_action: Literal["report", "drop"] = "report"
    """With --audit-data: report the flagged samples only, or leave them out of training."""
    train_fraction: float = _T.train_fraction
    """Share of each class of the training split used, picked by --seed (the low-data setting)."""
    synthetic: int = 0
    """cGAN samples added to the training split, balanced over the classes (needs a generator: dynray gan)."""
    gan: str | None = None
    """Generator that --synthetic samples (default: the newest cgan-DATASET)."""
    real_repeats: int = _T.real_repeats
    """With --synthetic: copies of the real images in the training set (sets the real share of each batch)."""

    def __post_init__(self) -> None:
        if self.synthetic < 0:
            raise ConfigError("--synthetic must be >= 0", got=self.synthetic, fix="e.g. --synthetic 3150 (cGAN samples added to training)")

    def model_config(self) -> DynamicNetConfig:
        """The model to train: --arch-from's architecture, else the architecture family's
        default with the MoE flags applied."""
        if self.arch_from is not None:
            info = job_registry().resolve(self.arch_from)
            cfg = config_from_dict(info.meta["config"])
            if info.meta.get("dataset") != self.dataset:
                raise ConfigError("--arch-from names a model of another dataset", got=(self.arch_from, info.meta.get("dataset")), fix=f"pick a model trained on {self.dataset}, or pass --dataset {info.meta.get('dataset')}")
            return cfg
        if self.arch == "dense":
            return model_config_for(self.dataset, "dense")
        cfg = model_config_for(self.dataset, "moe")
        assert cfg.moe is not None
        f = self.moe
        moe = replace(cfg.moe, num_experts=f.experts, top_k=f.top_k, gate=f.gate, groups=f.groups, shared_experts=f.shared_experts,
                      capacity_factor_train=f.capacity_factor, capacity_factor_eval=f.eval_capacity_factor)
        if f.moe_stages:  # explicit stages keep the dense layer counts
            cfg = replace(cfg, layers=model_config_for(self.dataset, "dense").layers)
            moe = replace(moe, stages=tuple(f.moe_stages))
        return replace(cfg, moe=moe.dense_equivalent() if self.arch == "moe-dense" else moe)

    def train_config(self, finetune: FinetuneConfig | None = None, exclude: tuple[int, ...] = ()) -> TrainConfig:
        """The library's TrainConfig (validated there: errors name the fix)."""
        return TrainConfig(dataset=self.dataset, model=self.model_config(), epochs=self.epochs, workers=self.workers, batch_size=self.batch_size,
                           lr=self.lr, seed=self.seed, distill_alpha=self.distill, schedule=self.schedule, augment=self.augment, finetune=finetune,
                           exclude_train=exclude, train_fraction=self.train_fraction,
                           real_repeats=self.real_repeats)


@dataclass(frozen=True)
class Result:
    model: str
    """The registered ref, name:vN."""
    metrics: dict
    """Validation metrics recorded with the model."""
    seconds: float
    """Training wall-clock time."""
    parent: str | None = None
    """The model it was fine-tuned from, if any."""
    audit: dict | None = None
    """With --audit-data: what the audit flagged (see :func:`audit_training_split`)."""

    def summary(self) -> str:
        start = f" (fine-tuned from {self.parent})" if self.parent else ""
        out = f"registered {self.model}{start}: val accuracy per exit {[round(a, 4) for a in self.metrics['val_exit_accuracy']]} in {self.seconds:.0f}s"
        if self.audit is not None:
            a = self.audit
            out = (f"data audit: {a['flagged']} of {a['n']} training samples flagged ({a['labels']} by the label audit, {a['backdoor']} by activation "
                   f"clustering), {'left out of training' if a['action'] == 'drop' else 'kept (report only)'}; details in {a['path']}\n") + out
        return out


def audit_training_split(cfg: Config) -> dict:
    """Run both poisoning audits on ``cfg``'s training split (in process, a few small models);
    log the flags and write them to ``$DYNRAY_HOME/audits/``."""
    import json
    import time

    import numpy as np

    from dynray.fileio import write_atomic
    from dynray.registry import default_home
    from dynray.security.anomaly import train_audit_model, audit_backdoor, audit_labels

    split = load_dataset(cfg.dataset, "train")
    log.info("auditing %d training samples of %s for poisoning (out-of-fold label audit, then activation clustering) …", len(split.labels), cfg.dataset)
    labels = audit_labels(split.images, split.labels, split.num_classes, seed=cfg.seed, progress=lambda k, n: log.info("label audit: fold %d/%d", k, n))
    model = train_audit_model(split.images, split.labels, split.num_classes, epochs=5, seed=cfg.seed)
    backdoor = audit_backdoor(model, split.images, split.labels, split.num_classes, seed=cfg.seed)
    flagged = np.union1d(labels.flagged, backdoor.flagged)
    for r in (labels, backdoor):
        log.warning("poisoning audit (%s): %d of %d training samples flagged", r.method, len(r.flagged), r.n)
    path = default_home() / "audits" / f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    body = {"dataset": cfg.dataset, "n": int(split.labels.numel()), "action": cfg.audit_action, "flagged": flagged.tolist(),
            "labels": {"method": labels.method, "flagged": labels.flagged.tolist(), **labels.detail},
            "backdoor": {"method": backdoor.method, "flagged": backdoor.flagged.tolist(), **backdoor.detail}}
    write_atomic(path, json.dumps(body, indent=1))
    return {"n": body["n"], "flagged": len(flagged), "labels": len(labels.flagged), "backdoor": len(backdoor.flagged), "action": cfg.audit_action,
            "path": str(path), "indices": tuple(int(i) for i in flagged)}


def synthetic_images(cfg: Config) -> tuple[Split | None, dict]:
    """``--synthetic`` samples of the dataset's generator, and what the model's meta records of them."""
    if cfg.synthetic == 0:
        return None, {}
    from dynray.gan import gan_name, load_generator, synthetic_split

    ref = cfg.gan or gan_name(cfg.dataset)
    try:
        g, info = load_generator(job_registry(), ref)
    except (RegistryError, UnknownNameError) as e:
        raise ConfigError(f"--synthetic needs a cGAN generator; {ref} cannot be loaded", got=str(e).splitlines()[0][:200],
                          fix=f"train one: dynray gan --dataset {cfg.dataset} (or name one with --gan)") from e
    if info.meta.get("dataset") != cfg.dataset:
        raise ConfigError("--gan names a generator of another dataset", got=(info.ref, info.meta.get("dataset")), fix=f"train one on {cfg.dataset}: dynray gan --dataset {cfg.dataset}")
    seen = (info.meta.get("fraction"), (info.meta.get("job_config") or {}).get("seed"))
    if cfg.train_fraction < 1.0 and seen != (cfg.train_fraction, cfg.seed):
        log.warning("%s was trained on fraction %s of the training split (seed %s), this run trains on %s (seed %s): its samples carry images this run does not see;"
                    " for a low-data run, train the generator with the same --fraction and --seed", info.ref, seen[0], seen[1], cfg.train_fraction, cfg.seed)
    log.info("adding %d samples of %s to the training split", cfg.synthetic, info.ref)
    return synthetic_split(g, cfg.synthetic, dataset=cfg.dataset, seed=cfg.seed), {"synthetic": {"images": cfg.synthetic, "generator": info.ref}}


def default_name(dataset: str, arch: str) -> str:
    return {"dense": f"dynnet-{dataset}", "moe": f"moe-{dataset}", "moe-dense": f"moe-{dataset}-dense"}[arch]


def run(cfg: Config, *, finetune: FinetuneConfig | None = None, init_ref: str | None = None) -> Result:
    """Train (or fine-tune ``init_ref``) on the connected Ray and register the model."""
    tcfg = cfg.train_config(finetune)  # bad input fails here, before Ray starts
    audit = audit_training_split(cfg) if cfg.audit_data else None
    if audit is not None and cfg.audit_action == "drop":
        tcfg = replace(tcfg, exclude_train=audit["indices"])
    registry = job_registry()
    init_state = parent = None
    if init_ref is not None:  # fine-tuning starts from a registered model
        stored = load_model(registry, init_ref)
        init_state, parent = stored.model.state_dict(), stored.info.ref
        tcfg = replace(tcfg, model=stored.model.cfg)
    val = load_dataset(tcfg.dataset, "val", root=tcfg.data_root)  # missing files: one clear error before Ray starts
    synthetic, extra = synthetic_images(cfg)
    connect(num_cpus=max(2, tcfg.workers))
    name = cfg.name or (None if init_ref else default_name(tcfg.dataset, cfg.arch))
    if cfg.arch_from is not None and cfg.name is None:
        name = f"{registry.resolve(cfg.arch_from).name}-retrained"
    info, outcome = train_and_register(tcfg, registry, name=name, parent=parent, init_state=init_state, val=val, synthetic=synthetic, extra=extra)
    return Result(model=info.ref, metrics=info.meta["metrics"], seconds=outcome.seconds, parent=parent,
                  audit={k: v for k, v in audit.items() if k != "indices"} if audit else None)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.train") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.train"))
