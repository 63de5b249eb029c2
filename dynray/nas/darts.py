"""DARTS-style differentiable architecture search over DynamicNet stages (Liu et al. 2019).

The supernet has the DynamicNet layout (stages that halve the resolution, an exit after
every stage), but every conv position is a **mixed operation**: a softmax(α)-weighted sum of
candidate operations. A stage's first position mixes a 3x3 and a 5x5 conv (it changes the
width and the resolution); its later positions mix 3x3, 5x5 and *skip*, so skipping
positions shortens the stage. The loss is the multi-exit loss of every exit, so α is chosen
for early exits as well as the last one.

- **Alternating updates** (first-order DARTS): a weight step on a training batch, then an α
  step on a held-out batch. As in the DARTS paper, the held-out batches are a part of the
  training split, so the real val split stays clean for calibration and selection.
- **Compute-aware** (FBNet, Wu et al. 2019): the α loss adds ``mac_weight`` times the
  supernet's expected MACs relative to its heaviest path, so equal-accuracy choices go to
  the cheaper operation.
- **Discretisation**: each position keeps its strongest operation; a stage's kernel is the
  kernel with the most α mass over its conv positions, its depth 1 + the positions that did
  not choose skip. The result is a normal :class:`~dynray.nas.space.Candidate`, built and
  trained by the same builder and loop as every other trial. (The first stage's first
  conv of a built DynamicNet is its 5x5 strided stem, whatever that position chose.)

Shape legend: B batch, C channels, H×W resolution, P positions per stage, O operations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynray.data import Split
from dynray.errors import ConfigError
from dynray.nas.space import Candidate, SearchSpace

__all__ = ["DartsConfig", "MixedOp", "DartsStage", "DartsSupernet", "DartsResult", "darts_search"]
log = logging.getLogger(__name__)

SKIP = 0  # operation index of skip in a later position


@dataclass(frozen=True, kw_only=True)
class DartsConfig:
    """The supernet and its alternating optimisation."""

    widths: tuple[int, ...] = (16, 32, 64)
    """Channels per stage (fixed: DARTS searches operations and depth)."""
    positions: int = 3
    """Conv positions per stage (the deepest stage DARTS may choose)."""
    kernels: tuple[int, ...] = (3, 5)
    """Kernel sizes of the conv operations."""
    epochs: int = 3
    """Search epochs over the weight half of the training split."""
    batch_size: int = 64
    """Samples per step (weights and α)."""
    weight_lr: float = 3e-3
    """Adam learning rate of the supernet weights."""
    arch_lr: float = 3e-3
    """Adam learning rate of α (the DARTS paper's 3e-4 is for 50 epochs; 3 need more)."""
    mac_weight: float = 0.05
    """Weight of the expected-MACs term in the α loss (0: accuracy only)."""
    heldout: float = 0.5
    """Share of the training split held out for the α steps."""
    exit_hidden: int = 64
    """Hidden units of the supernet's early exit heads."""
    lr: float = 3e-3
    """Learning rate given to the discretised candidate."""
    weight_decay: float = 5e-4
    """Weight decay given to the discretised candidate."""
    seed: int = 0
    """Seeds the supernet init and the batch order."""

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise ConfigError("DARTS needs at least 2 stages of positive width", got=self.widths, fix="e.g. widths=(16, 32, 64)")
        if self.positions < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("positions, epochs and batch_size must be >= 1", got=(self.positions, self.epochs, self.batch_size), fix="e.g. positions=3, epochs=3")
        if not self.kernels or any(k % 2 == 0 or k < 1 for k in self.kernels):
            raise ConfigError("DARTS kernels must be odd and positive", got=self.kernels, fix="e.g. (3, 5)")
        if not 0 < self.heldout < 1 or self.mac_weight < 0:
            raise ConfigError("heldout must be in (0, 1) and mac_weight >= 0", got=(self.heldout, self.mac_weight), fix="e.g. heldout=0.5, mac_weight=0.05")


def _conv(c_in: int, c_out: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MixedOp(nn.Module):
    """Σ_o softmax(α)_o · op_o(x) over conv kernels (and skip, when ``with_skip``)."""

    def __init__(self, c_in: int, c_out: int, kernels: tuple[int, ...], stride: int, *, with_skip: bool) -> None:
        super().__init__()
        self.with_skip = with_skip
        self.kernels = kernels
        self.ops = nn.ModuleList([_conv(c_in, c_out, k, stride) for k in kernels])
        self.stride, self.c_in, self.c_out = stride, c_in, c_out

    @property
    def num_ops(self) -> int:
        return len(self.ops) + int(self.with_skip)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W]; w: [O] softmax weights, skip first when present
        convs = w[1:] if self.with_skip else w
        out = sum(wi * op(x) for wi, op in zip(convs, self.ops, strict=True))
        if self.with_skip:
            out = out + w[0] * x  # skip keeps shape: only in positions with stride 1, C_in == C_out
        return out  # [B, C_out, H', W']

    def op_macs(self, h_out: int, w_out: int) -> torch.Tensor:
        """[O] MACs per sample of each operation (skip costs 0)."""
        conv = [self.c_in * self.c_out * k * k * h_out * w_out for k in self.kernels]
        return torch.tensor(([0.0] if self.with_skip else []) + conv, dtype=torch.float32)


class DartsStage(nn.Module):
    """One stage: a first position (conv choices, may stride) + later positions (conv or skip)."""

    def __init__(self, c_in: int, width: int, cfg: DartsConfig, *, stride: int, h_out: int) -> None:
        super().__init__()
        self.mixed = nn.ModuleList([MixedOp(c_in, width, cfg.kernels, stride, with_skip=False)])
        self.mixed.extend(MixedOp(width, width, cfg.kernels, 1, with_skip=True) for _ in range(cfg.positions - 1))
        n_ops = len(cfg.kernels) + 1
        # α per position; the first position has no skip, so its skip logit is unused (masked)
        self.alpha = nn.Parameter(1e-3 * torch.randn(cfg.positions, n_ops))
        self.register_buffer("mask", torch.tensor([[0.0] + [1.0] * len(cfg.kernels)] + [[1.0] * n_ops] * (cfg.positions - 1)))
        self.register_buffer("macs", torch.stack([F.pad(m.op_macs(h_out, h_out), (n_ops - m.num_ops, 0)) for m in self.mixed]))

    def weights(self) -> torch.Tensor:
        """[P, O] softmax(α) per position (masked operations get weight 0)."""
        return F.softmax(self.alpha.masked_fill(self.mask == 0, float("-inf")), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        for p, op in enumerate(self.mixed):
            x = op(x, w[p] if op.with_skip else w[p, 1:])
        return x

    def expected_macs(self) -> torch.Tensor:
        return (self.weights() * self.macs).sum()

    def discretise(self, kernels: tuple[int, ...]) -> tuple[int, int]:
        """(stage kernel, layers) from the strongest operations."""
        w = self.weights().detach()
        later = w[1:]
        keep = [int(row.argmax()) != SKIP for row in later]
        mass = w[0, 1:].clone() + (later[:, 1:].sum(dim=0) if len(later) else 0)
        return kernels[int(mass.argmax())], 1 + sum(keep)


class DartsSupernet(nn.Module):
    """Stages of :class:`DartsStage` with DynamicNet-style exit heads."""

    def __init__(self, cfg: DartsConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        c, h, _ = input_shape
        self.stages, self.exits = nn.ModuleList(), nn.ModuleList()
        k_last = len(cfg.widths) - 1
        for k, width in enumerate(cfg.widths):
            stride = 2 if k < k_last else 1
            h = (h + 1) // 2 if stride == 2 else h
            self.stages.append(DartsStage(c, width, cfg, stride=stride, h_out=h))
            c = width
            if k < k_last:
                pool = min(7, h)
                self.exits.append(nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(width * pool * pool, cfg.exit_hidden), nn.ReLU(inplace=True), nn.Linear(cfg.exit_hidden, num_classes)))
            else:
                self.exits.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # x: [B, C, H, W] -> K exit logits [B, classes]
        out = []
        for stage, head in zip(self.stages, self.exits, strict=True):
            x = stage(x)
            out.append(head(x))
        return out

    def arch_parameters(self) -> list[nn.Parameter]:
        return [s.alpha for s in self.stages]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def expected_macs(self) -> torch.Tensor:
        return sum(s.expected_macs() for s in self.stages)  # type: ignore[return-value]

    def max_macs(self) -> float:
        return float(sum(s.macs.max(dim=1).values.sum() for s in self.stages))

    def discretise(self, space: SearchSpace, *, lr: float, weight_decay: float) -> Candidate:
        """The strongest operations as a candidate of ``space`` (latent genes padded)."""
        kernels, layers = [], []
        for stage in self.stages:
            kern, n = stage.discretise(self.cfg.kernels)
            kernels.append(kern)
            layers.append(n)
        k = len(self.cfg.widths)
        pad = space.max_stages - k
        if pad < 0:
            raise ConfigError("the DARTS supernet has more stages than the search space allows", got=k, fix=f"use at most {space.max_stages} widths")
        cand = Candidate(
            num_stages=k, widths=self.cfg.widths + (self.cfg.widths[-1],) * pad, layers=tuple(layers) + (1,) * pad,
            kernels=tuple(kernels) + (kernels[-1],) * pad, exit_hidden=self.cfg.exit_hidden, lr=lr, weight_decay=weight_decay,
        )
        space.check(cand)
        return cand


@dataclass(frozen=True)
class DartsResult:
    """What the search found."""

    candidate: Candidate
    alphas: list[list[list[float]]]  # per stage, per position: softmax weights (skip first)
    history: list[dict]
    seconds: float


def _multi_exit_ce(logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(z, y) for z in logits) / len(logits)  # type: ignore[return-value]


def darts_search(
    train: Split, space: SearchSpace, cfg: DartsConfig = DartsConfig(), *, on_epoch: Callable[[dict], None] | None = None,
) -> DartsResult:
    """Alternating first-order DARTS on ``train`` (weights) and its held-out part (α)."""
    for k, w in enumerate(cfg.widths):
        if w not in space.stage_widths(k):
            raise ConfigError(f"a DARTS width is not a choice of the search space for stage {k}", got=w, fix=f"use one of {space.stage_widths(k)}")
    if cfg.positions > max(space.layers) or not set(cfg.kernels) <= set(space.kernels):
        raise ConfigError("the DARTS supernet is deeper or has kernels outside the search space", got=(cfg.positions, cfg.kernels), fix=f"positions <= {max(space.layers)}, kernels among {space.kernels}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=gen)
    n_arch = int(len(train) * cfg.heldout)
    w_idx, a_idx = order[n_arch:], order[:n_arch]
    net = DartsSupernet(cfg, tuple(train.images.shape[1:]), train.num_classes)  # type: ignore[arg-type]
    w_opt = torch.optim.Adam(net.weight_parameters(), lr=cfg.weight_lr)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=cfg.arch_lr, betas=(0.5, 0.999))
    max_macs = net.max_macs()
    history: list[dict] = []
    t0 = time.perf_counter()
    steps = min(len(w_idx), len(a_idx)) // cfg.batch_size
    for epoch in range(cfg.epochs):
        net.train()
        wp = w_idx[torch.randperm(len(w_idx), generator=gen)]
        ap = a_idx[torch.randperm(len(a_idx), generator=gen)]
        w_loss = a_loss = 0.0
        for i in range(steps):
            bw, ba = wp[i * cfg.batch_size : (i + 1) * cfg.batch_size], ap[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            loss = _multi_exit_ce(net(train.images[bw]), train.labels[bw])  # weights on training data
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
            w_opt.step()
            w_loss += loss.item()
            aloss = _multi_exit_ce(net(train.images[ba]), train.labels[ba]) + cfg.mac_weight * net.expected_macs() / max_macs  # α on held-out data
            a_opt.zero_grad(set_to_none=True)
            aloss.backward()
            a_opt.step()
            a_loss += aloss.item()
        row = {"epoch": epoch + 1, "weight_loss": w_loss / max(steps, 1), "arch_loss": a_loss / max(steps, 1), "expected_macs": net.expected_macs().item(), "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("DARTS epoch %d/%d  weight loss %.3f  arch loss %.3f  expected MACs %.0f", epoch + 1, cfg.epochs, row["weight_loss"], row["arch_loss"], row["expected_macs"])
        if on_epoch is not None:
            on_epoch(row)
    cand = net.discretise(space, lr=cfg.lr, weight_decay=cfg.weight_decay)
    alphas = [s.weights().detach().tolist() for s in net.stages]
    return DartsResult(candidate=cand, alphas=alphas, history=history, seconds=time.perf_counter() - t0)

