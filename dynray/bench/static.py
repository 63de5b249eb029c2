"""Static baselines for the core bench: the cheapest plain CNN at the adaptive net's accuracy.

A skeptic compares an early-exit network with the cheapest *static* network of the same
accuracy, not with its own full path. This module trains a small sweep of LeNet-style plain
CNNs (:class:`StaticCNN`: 2 or 3 convolutions, several widths) with the project's recipe (the
same optimiser, learning-rate schedule, augmentation, batch size and epochs) and turns the
points into a frontier: for each accuracy, the fewest MACs a static net needs to reach it.
Results are cached per (net, recipe, seed, data digest) in a JSON file, so a rerun of the
bench on unchanged data and recipe trains nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dynray.augment import random_affine
from dynray.data import Split
from dynray.errors import ConfigError
from dynray.fileio import write_atomic
from dynray.models.macs import module_macs
from dynray.training import TrainConfig, lr_factor

__all__ = ["StaticSweepConfig", "StaticCNN", "train_static", "Job", "MapFn", "train_serially", "sweep", "static_frontier", "pareto", "macs_at_accuracy"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StaticSweepConfig:
    """The plain CNNs the core bench trains as baselines."""

    widths: tuple[int, ...] = (4, 8, 16, 32)
    """Channels of the first conv (the later ones have twice as many)."""
    convs: tuple[int, ...] = (2, 3)
    """Conv layers per net."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One init and data order per seed; a point's accuracy is the mean over seeds."""
    epochs: int | None = None
    """Training epochs; None = the recipe's (the adaptive model's own budget)."""

    def __post_init__(self) -> None:
        if not self.widths or not self.seeds or min(self.widths) < 1 or (self.epochs is not None and self.epochs < 1) or not set(self.convs) <= {2, 3} or not self.convs:
            raise ConfigError("the static sweep needs widths >= 1, convs of 2 or 3, a seed and an epoch",
                              got={"widths": self.widths, "convs": self.convs, "seeds": self.seeds, "epochs": self.epochs},
                              fix="e.g. --static.widths 4 8 16 32 --static.convs 2 3 --static.seeds 0 1 2")


class StaticCNN(nn.Module):
    """conv(w, 5x5) - pool - conv(2w) - pool [- conv(2w)] - linear: a LeNet-style plain CNN."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int, convs: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.width, self.convs = width, convs
        layers: list[nn.Module] = [nn.Conv2d(c, width, 5, padding=2, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                   nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        if convs == 3:
            layers += [nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(2 * width * (h // 4) * (w // 4), num_classes)
        self.macs, _ = module_macs(self, torch.zeros(1, *input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> logits [B, K]
        return self.head(self.body(x))


def _train_plain(net: StaticCNN, data: Split, recipe: TrainConfig, seed: int) -> StaticCNN:
    """The recipe of :func:`dynray.training.train_epoch` for a single-output net: AdamW, one
    warm-up epoch then cosine decay, the random affine augmentation, ``recipe.epochs`` epochs."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = len(data) // recipe.batch_size
    total = steps * recipe.epochs
    net.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        gen = torch.Generator().manual_seed(seed * 1000 + epoch * 17)
        for i in range(steps):
            for g in opt.param_groups:
                g["lr"] = recipe.lr * lr_factor(epoch * steps + i, steps, total)
            b = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            xb = random_affine(data.images[b], gen, hflip=data.images.shape[1] == 3) if recipe.augment else data.images[b]
            loss = F.cross_entropy(net(xb), data.labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def train_static(width: int, convs: int, train: Split, test: Split, recipe: TrainConfig, seed: int) -> dict:
    """Train one static net with ``recipe`` and measure it on ``test``."""
    torch.manual_seed(seed)
    net = StaticCNN(train.input_shape, train.num_classes, width, convs)
    t0 = time.perf_counter()
    _train_plain(net, train, recipe, seed)
    with torch.no_grad():
        pred = torch.cat([net(test.images[i : i + 512]).argmax(1) for i in range(0, len(test), 512)])
    acc = float((pred == test.labels).float().mean())
    return {"width": width, "convs": convs, "seed": seed, "macs": int(net.macs), "accuracy": acc, "seconds": time.perf_counter() - t0}


def _key(net: tuple[int, int], recipe: TrainConfig, seed: int, data: tuple[Split, Split]) -> str:
    r = dataclasses.asdict(dataclasses.replace(recipe, model=None, data_root=None, storage_path=None, workers=1))
    digest = hashlib.sha256()
    for s in data:  # the data themselves: a changed split invalidates the cache
        digest.update(s.images.numpy().tobytes())
        digest.update(s.labels.numpy().tobytes())
    body = json.dumps({"net": list(net), "recipe": r, "seed": seed, "data": digest.hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:24]


Job = tuple[int, int, int]
"""(width, convs, seed) of one static net to train."""
MapFn = Callable[[Split, Split, TrainConfig, list[Job]], Iterable[dict]]
"""Trains the jobs (train split, test split, recipe, jobs) and yields their rows in order."""


def train_serially(train: Split, test: Split, recipe: TrainConfig, jobs: list[Job]) -> Iterator[dict]:
    """The default :data:`MapFn`: one net after another in this process."""
    for w, c, seed in jobs:
        yield train_static(w, c, train, test, recipe, seed)


def sweep(train: Split, test: Split, recipe: TrainConfig, cfg: StaticSweepConfig = StaticSweepConfig(), *, cache: str | Path | None = None,
          map_fn: MapFn = train_serially) -> list[dict]:
    """Every (width, convs) of ``cfg`` for every seed: one row each, from ``cache`` when it
    holds them; the others trained by ``map_fn`` (e.g. as Ray tasks) and added to the cache."""
    recipe = dataclasses.replace(recipe, epochs=cfg.epochs or recipe.epochs)
    path = Path(cache) if cache is not None else None
    stored: dict = json.loads(path.read_text()) if path is not None and path.exists() else {}
    keys = {(w, c, seed): _key((w, c), recipe, seed, (train, test)) for c in cfg.convs for w in cfg.widths for seed in cfg.seeds}
    missing = [job for job, k in keys.items() if k not in stored]
    if missing:
        log.info("static sweep: training %d of %d nets (%d epochs each; %d from the cache)", len(missing), len(keys), recipe.epochs, len(keys) - len(missing))
    for i, (job, row) in enumerate(zip(missing, map_fn(train, test, recipe, missing), strict=True)):
        stored[keys[job]] = row
        log.info("static net %d/%d (width %d, %d convs, seed %d): %d MACs, accuracy %.4f", i + 1, len(missing), *job, row["macs"], row["accuracy"])
        if path is not None:  # after every net: an interrupted sweep resumes where it stopped
            write_atomic(path, json.dumps(stored, indent=1))
    return [stored[k] for k in keys.values()]


def static_frontier(rows: list[dict]) -> list[dict]:
    """Seed means per net, then the nets no cheaper net beats in accuracy, by MACs."""
    by_net: dict[tuple, list[dict]] = {}
    for r in rows:
        by_net.setdefault((r["width"], r["convs"]), []).append(r)
    return pareto([{"width": k[0], "convs": k[1], "macs": v[0]["macs"], "accuracy": sum(x["accuracy"] for x in v) / len(v), "seeds": len(v)} for k, v in by_net.items()])


def pareto(points: list[dict]) -> list[dict]:
    """``macs``/``accuracy`` points -> those no cheaper point matches in accuracy, cheapest first."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p["macs"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def macs_at_accuracy(front: list[dict], accuracy: float) -> float | None:
    """Fewest MACs on a frontier (``macs``/``accuracy`` points, cheapest first, rising
    accuracy) that reach ``accuracy``, interpolated linearly between neighbouring points;
    None when no point reaches it."""
    for i, p in enumerate(front):
        if p["accuracy"] >= accuracy - 1e-12:
            if i == 0:
                return float(p["macs"])
            q = front[i - 1]
            t = (accuracy - q["accuracy"]) / (p["accuracy"] - q["accuracy"])
            return float(q["macs"] + t * (p["macs"] - q["macs"]))
    return None
