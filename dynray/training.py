"""Data-parallel multi-exit training with Ray Train's TorchTrainer.

Ray Train is used here as a library (the design's allowed exception): :func:`fit` builds the
``TorchTrainer`` and :func:`train_loop_per_worker` runs inside each worker. The epoch and
evaluation functions are plain torch and run without Ray.

Each worker loads the split itself (an in-memory tensor), takes a disjoint, equal-sized
shard of a seeded per-epoch permutation, and DDP (gloo) averages the gradients. Rank 0
writes a checkpoint every epoch (weights in safetensors, optimizer state, history), and a
restarted run resumes from the latest one.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dynray.augment import random_affine
from dynray.data import Split, dataset_spec, load_dataset, subsample
from dynray.errors import ConfigError
from dynray.evaluation import collect_exit_outputs, simulate
from dynray.finetune import FinetuneConfig, param_groups, set_frozen_modes, trainable_stages
from dynray.models import DynamicNet, DynamicNetConfig, MultiExitLoss, build
from dynray.models.defaults import default_model_config
from dynray.models.moe import MoEUsage
from dynray.registry import default_home
from dynray.annealing import anneal, anneal_vector
from dynray.thresholds import ThresholdRule

ExtraLoss = Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["ExtraLoss", "TrainConfig", "TrainOutcome", "lr_factor", "make_optimizer", "train_epoch", "train_local", "evaluate", "training_split", "without", "train_loop_per_worker", "fit"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run."""

    dataset: str = "mnist-5k"
    """Dataset name (see dynray.data.dataset_names())."""
    model: DynamicNetConfig | None = None
    """Model config; None picks the default for the dataset's input shape."""
    epochs: int = 20
    """Passes over the training split."""
    batch_size: int = 64
    """Samples per worker per step."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up for 1 epoch, then cosine decay)."""
    weight_decay: float = 5e-4
    """AdamW decoupled weight decay."""
    seed: int = 0
    """Seeds the model init, the data order and the augmentation."""
    workers: int = 2
    """Ray Train workers (data-parallel replicas), 1 CPU each."""
    augment: bool = True
    """Random affine augmentation (plus horizontal flips for 3-channel data)."""
    schedule: str = "cosine"
    """Annealing schedule for exit loss weights and the monitoring threshold."""
    exit_weights_start: tuple[float, ...] | None = None
    """Per-exit loss weights at epoch 0; None = 0.3 for early exits, 1 for the last."""
    exit_weights_end: tuple[float, ...] | None = None
    """Per-exit loss weights at the last epoch; None = 1 for every exit."""
    distill_alpha: float = 0.5
    """Self-distillation share of the early exits' loss (0 disables it)."""
    temperature: float = 3.0
    """Distillation temperature."""
    threshold_start: float = 0.5
    """Max-softmax threshold used for the adaptive validation numbers at epoch 0 (permissive)."""
    threshold_end: float = 0.9
    """…and at the last epoch (strict). It also seeds the model's uncalibrated thresholds."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints; None = $DYNRAY_HOME/runs."""
    finetune: FinetuneConfig | None = None
    """Fine-tuning plan when starting from a registered model."""
    exclude_train: tuple[int, ...] = ()
    """Training-split indices left out (what a data audit flagged: ``dynray train --audit-data drop``)."""
    train_fraction: float = 1.0
    """Share of each class of the training split used, picked by ``seed`` (the low-data setting)."""
    real_repeats: int = 1
    """Copies of the real images next to synthetic ones (sets the real share of each batch)."""

    def __post_init__(self) -> None:
        dataset_spec(self.dataset)  # unknown names fail here, before any worker starts
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1:
            raise ConfigError("epochs, batch_size and workers must be >= 1", got=(self.epochs, self.batch_size, self.workers), fix="e.g. --epochs 15 --workers 2")
        if self.lr <= 0:
            raise ConfigError("lr must be positive", got=self.lr, fix="e.g. --lr 3e-3")
        if self.real_repeats < 1:
            raise ConfigError("real_repeats must be >= 1", got=self.real_repeats, fix="e.g. --real-repeats 9 (half of each batch real next to 9x as many samples)")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError("train_fraction must lie in (0, 1]", got=self.train_fraction, fix="e.g. --train-fraction 0.1 for 10% of each class")
        for w in (self.exit_weights_start, self.exit_weights_end):
            if w is not None and (len(w) != self.model_config().num_exits or min(w) < 0 or sum(w) <= 0):
                raise ConfigError("exit weights need one non-negative value per exit", got=w, fix=f"give {self.model_config().num_exits} values")

    def model_config(self) -> DynamicNetConfig:
        return self.model or default_model_config(self.dataset)

    def exit_weights(self, epoch: int, num_exits: int | None = None) -> tuple[float, ...]:
        """Per-exit loss weights at ``epoch`` for a model of ``num_exits`` exits (default: this config's model)."""
        k = num_exits or self.model_config().num_exits
        start = self.exit_weights_start or (0.3,) * (k - 1) + (1.0,)
        end = self.exit_weights_end or (1.0,) * k
        return anneal_vector(self.schedule, start, end, _progress(epoch, self.epochs))

    def threshold(self, epoch: int) -> float:
        return anneal(self.schedule, self.threshold_start, self.threshold_end, _progress(epoch, self.epochs))


def _progress(epoch: int, epochs: int) -> float:
    return epoch / max(1, epochs - 1)


@dataclass(frozen=True)
class TrainOutcome:
    model: DynamicNet
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    checkpoint_path: str | None = None
    seconds: float = 0.0


def lr_factor(step: int, steps_per_epoch: int, total: int) -> float:
    """Linear warm-up (one epoch, at most a tenth of the run), then cosine decay to 0."""
    warm = max(1, min(steps_per_epoch, total // 10))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def make_optimizer(model: DynamicNet, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one group per stage plus one for the exit heads (what :func:`train_epoch`
    schedules and fine-tuning freezes); each group remembers its peak ``initial_lr``."""
    ft = cfg.finetune
    groups = param_groups(model.stages, model.exits, head_lr=ft.head_lr if ft else cfg.lr, backbone_lr=ft.backbone_lr if ft else cfg.lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def train_epoch(
    net: nn.Module,
    model: DynamicNet,
    data: Split,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    epoch: int,
    *,
    rank: int = 0,
    world: int = 1,
    step0: int = 0,
    extra_loss: ExtraLoss | None = None,
) -> dict:
    """One epoch on this rank's shard. ``net`` is ``model`` or its DDP wrapper.

    ``extra_loss(xb, exit_logits, yb, loss) -> loss`` may reshape the step's loss (knowledge
    distillation from a teacher, :mod:`dynray.compress.distill`); the recipe stays the same.
    """
    n = len(data) // world  # equal shards keep DDP's all-reduces in step
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    shard = order[rank * n : (rank + 1) * n]
    steps = n // cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 17 + rank)
    loss_fn = MultiExitLoss(distill_alpha=cfg.distill_alpha, temperature=cfg.temperature)
    weights = cfg.exit_weights(epoch, model.num_exits)  # the model trained: a recipe may train another architecture than its default
    trainable = trainable_stages(cfg.finetune, model.num_exits, epoch)
    net.train()
    set_frozen_modes(model.stages, trainable)
    total_steps = steps * cfg.epochs
    base = [g["initial_lr"] for g in opt.param_groups]
    sums, seen = torch.zeros(model.num_exits), 0
    usage = MoEUsage()
    for i in range(steps):
        f = lr_factor(step0 + i, steps, total_steps)
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * f if (g["stage"] is None or g["stage"] in trainable) else 0.0
        b_idx = shard[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        xb, yb = data.images[b_idx], data.labels[b_idx]  # [b, C, H, W], [b]
        if cfg.augment:
            xb = random_affine(xb, gen, hflip=xb.shape[1] == 3)
        outs = net(xb)
        parts = loss_fn(outs, yb, weights)
        loss = parts.total if extra_loss is None else extra_loss(xb, outs, yb, parts.total)
        if model.moe_by_stage:  # balance + z losses of the MoE gates, with their coefficients
            loss = loss + model.moe_aux_loss()
            usage.add(model.moe_outputs())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += torch.tensor(parts.per_exit) * len(yb)
        seen += len(yb)
    out = {"loss_per_exit": (sums / max(seen, 1)).tolist(), "steps": steps, "exit_weights": list(weights)}
    if model.moe_by_stage:
        out["moe"] = usage.summary()
    return out


def train_local(model: DynamicNet, train: Split, cfg: TrainConfig, *, extra_loss: ExtraLoss | None = None, on_epoch: Callable[[int, dict], None] | None = None) -> DynamicNet:
    """Train ``model`` in this process with the same recipe as :func:`fit` (one worker, no Ray
    Train): what compression runs use for fine-tuning and students. Returns it in eval mode."""
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    steps = len(train) // cfg.batch_size
    for epoch in range(cfg.epochs):
        stats = train_epoch(model, model, train, opt, cfg, epoch, step0=epoch * steps, extra_loss=extra_loss)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return model.eval()


@torch.no_grad()
def evaluate(model: DynamicNet, data: Split, *, threshold: float) -> dict:
    """Per-exit accuracy, and the adaptive accuracy/MAC saving at one max-softmax threshold."""
    usage = MoEUsage()
    rec = collect_exit_outputs(model, data.images, data.labels, on_batch=usage.add if model.moe_by_stage else None)
    rule = ThresholdRule(thresholds=(threshold,) * (model.num_exits - 1))
    out = simulate(rec, rule)
    moe = {"moe": usage.summary()} if model.moe_by_stage else {}
    return {
        **moe,
        "exit_accuracy": rec.exit_accuracy(),
        "accuracy_full": rec.exit_accuracy()[-1],
        "threshold": threshold,
        "accuracy_adaptive": out.accuracy,
        "macs_ratio": rec.full_macs / out.mean_macs,
        "exit_fractions": list(out.exit_fractions),
    }


def _save_checkpoint(d: Path, model: DynamicNet, opt: torch.optim.Optimizer, epoch: int, history: list[dict]) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "epoch": epoch}, d / "train_state.pt")
    (d / "history.json").write_text(json.dumps(history))


def _quiet_ray_train_logs() -> None:
    """One progress line per epoch is enough: mute Ray Train's per-report INFO lines.

    Ray 2.60 logs them through ``logging.getLogger(__file__)`` in its execution context.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)


def training_split(cfg: TrainConfig, synthetic: Split | None = None) -> tuple[Split, Split]:
    """(real, trained-on): the training split less ``exclude_train``, ``train_fraction`` of
    each class of it, and that (``real_repeats`` times) plus ``synthetic`` images (e.g. cGAN
    samples) if any."""
    real = subsample(without(load_dataset(cfg.dataset, "train", root=cfg.data_root), cfg.exclude_train), cfg.train_fraction, seed=cfg.seed)
    if synthetic is None or len(synthetic) == 0:
        return real, real
    if synthetic.input_shape != real.input_shape or synthetic.num_classes != real.num_classes:
        raise ConfigError("synthetic images do not match the training split", got=(synthetic.input_shape, synthetic.num_classes),
                          fix=f"sample a generator trained on {cfg.dataset}")
    k = cfg.real_repeats
    return real, replace(real, images=torch.cat([real.images.repeat(k, 1, 1, 1), synthetic.images]), labels=torch.cat([real.labels.repeat(k), synthetic.labels]))


def without(split: Split, exclude: tuple[int, ...]) -> Split:
    """``split`` less the samples at ``exclude``."""
    if not exclude:
        return split
    keep = torch.ones(len(split.labels), dtype=torch.bool)
    keep[torch.tensor(exclude, dtype=torch.long)] = False
    return replace(split, images=split.images[keep], labels=split.labels[keep])


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs inside every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = loop_config["cfg"]
    init_state: dict[str, torch.Tensor] | None = loop_config.get("init_state")
    synthetic: Split | None = loop_config.get("synthetic")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0 and not logging.getLogger("dynray").handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_ray_train_logs()
    torch.manual_seed(cfg.seed)
    real, train = training_split(cfg, synthetic)
    val = load_dataset(cfg.dataset, "val", root=cfg.data_root)
    model = build(cfg.model_config())
    model.complexity.fit(real.images)  # deterministic: identical on every rank; real inputs only
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = make_optimizer(model, cfg)
    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # resume after a worker failure
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
            state = torch.load(Path(d) / "train_state.pt", weights_only=False)
            opt.load_state_dict(state["optimizer"])
            start = state["epoch"] + 1
            history = json.loads((Path(d) / "history.json").read_text())
    # an expert that gets no tokens in a step has no gradient there: DDP must expect that
    ddp_kwargs = {"find_unused_parameters": True} if model.moe_by_stage else None
    net = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs)
    steps_per_epoch = (len(train) // world) // cfg.batch_size
    t0 = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        stats = train_epoch(net, model, train, opt, cfg, epoch, rank=rank, world=world, step0=epoch * steps_per_epoch)
        metrics = {"epoch": epoch, **stats, **{f"val_{k}": v for k, v in evaluate(model, val, threshold=cfg.threshold(epoch)).items()}}
        history.append(metrics)
        if rank == 0:
            el = time.perf_counter() - t0
            eta = el / (epoch + 1 - start) * (cfg.epochs - epoch - 1)
            log.info(
                "epoch %d/%d  loss(last exit) %.3f  val acc per exit %s  adaptive@%.2f %.4f at %.1fx fewer MACs  [%.0fs, eta %.0fs]",
                epoch + 1, cfg.epochs, stats["loss_per_exit"][-1], [round(a, 4) for a in metrics["val_exit_accuracy"]],
                metrics["val_threshold"], metrics["val_accuracy_adaptive"], metrics["val_macs_ratio"], el, eta,
            )
            if "moe" in stats:
                tr, va = stats["moe"], metrics["val_moe"]
                log.info(
                    "    experts: least share %.2fx uniform (val %.2fx), dropped %.2f%% in training, %.2f%% on val",
                    tr["expert_share_min_vs_uniform"], va["expert_share_min_vs_uniform"], 100 * tr["dropped_frac"], 100 * va["dropped_frac"],
                )
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                _save_checkpoint(Path(d), model, opt, epoch, history)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, checkpoint=checkpoint)


def fit(cfg: TrainConfig, *, init_state: dict[str, torch.Tensor] | None = None, run_name: str | None = None, synthetic: Split | None = None) -> TrainOutcome:
    """Train with Ray Train on the connected Ray cluster; returns the trained model.

    ``synthetic`` images (cGAN samples, :mod:`dynray.gan`) join the training split in every worker.

    The caller owns ``ray.init``; this function only needs a connected Ray.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = Path(cfg.storage_path or default_home() / "runs").absolute()
    storage.mkdir(parents=True, exist_ok=True)
    name = run_name or f"train-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "init_state": init_state, "synthetic": synthetic},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            storage_path=str(storage),
            name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint; see the logs under {storage / name}")
    model = build(cfg.model_config())
    with result.checkpoint.as_directory() as d:
        model.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
        history = json.loads((Path(d) / "history.json").read_text())
    return TrainOutcome(model=model.eval(), config=cfg, history=history, checkpoint_path=result.checkpoint.path, seconds=time.perf_counter() - t0)
