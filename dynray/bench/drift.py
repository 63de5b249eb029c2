"""The drift bench's streams and its offline replay.

Streams (all from a split's digits, as uint8-valued float images in [0, 1]):

- ``in_distribution``: test digits resampled with replacement, lightly augmented (a random
  rotation within 8 degrees, shift within 5%, scale 0.95-1.05);
- ``inverted``: 1 - x; ``rotated90``: a quarter turn; ``noise``: x + N(0, 0.3^2), clipped.

:func:`replay` pushes a stream through a model and its stop rule in process and feeds the
answered samples to a :class:`~dynray.drift.DriftMonitor`, exactly as the ingress does; the
bench job runs the same streams against the live service instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dynray.augment import random_affine
from dynray.drift import DriftConfig, DriftMonitor, DriftReference, sample_features
from dynray.errors import ConfigError

__all__ = ["SHIFTS", "shifted", "in_distribution", "Replay", "replay", "quantise"]


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels: what a client sending uint8 images delivers."""
    return (x.clamp(0, 1) * 255).round() / 255


def _noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x + 0.3 * torch.randn(x.shape, generator=gen)


SHIFTS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "inverted": lambda x, g: 1.0 - x,
    "rotated90": lambda x, g: torch.rot90(x, 1, dims=(2, 3)),
    "noise": _noise,
}
"""The issue's three shifts: name -> (images [B, C, H, W], generator) -> shifted images."""


def shifted(name: str, images: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` digits drawn from ``images`` with shift ``name`` applied, 8-bit quantised."""
    if name not in SHIFTS:
        raise ConfigError("unknown shift", got=name, fix=f"one of {', '.join(SHIFTS)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(images), (n,), generator=g)
    return quantise(SHIFTS[name](images[idx], g))


def in_distribution(images: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` digits resampled from ``images`` with light augmentation, 8-bit quantised."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(images), (n,), generator=g)
    return quantise(random_affine(images[idx], g, degrees=8.0, translate=0.05, scale=(0.95, 1.05)))


@dataclass(frozen=True)
class Replay:
    """Where a replay alarmed: sample index of each alarm (1-based), and the scores seen."""

    alarms_at: tuple[int, ...]
    scores: tuple[float, ...]
    threshold: float


@torch.no_grad()
def replay(model, rule, reference: DriftReference, streams: list[torch.Tensor], *, cfg: DriftConfig = DriftConfig(), batch: int = 1) -> list[Replay]:
    """Feed each stream in turn to one monitor (the state carries over, as on a live ingress).

    ``batch`` images per request. Returns one :class:`Replay` per stream, alarm positions
    counted from that stream's first sample.
    """
    mon = DriftMonitor(reference, cfg)
    model.eval()
    out = []
    for s in streams:
        alarms, scores = [], []
        for i in range(0, len(s), batch):
            x = s[i : i + batch]
            probs = torch.softmax(model.forward_exits(x, rule).logits.float(), dim=1)
            if mon.observe(sample_features(x, probs)) is not None:
                alarms.append(i + len(x))
            if mon.score is not None:
                scores.append(mon.score)
        out.append(Replay(tuple(alarms), tuple(scores), mon.threshold))
    return out
