"""Real attacks on a dynray model, for the detectors' tests and ``dynray bench security``.

- :func:`fgsm` and :func:`pgd`: white-box evasion (Goodfellow et al. 2015; Madry et al. 2018)
  on inputs in [0, 1], against the served model: the loss is the cross-entropy of *every*
  exit, so the answer flips whichever exit the input would leave at.
- :func:`flip_labels` and :func:`add_backdoor`: training-set poisoning (random label flips;
  a BadNets-style corner trigger relabelled to a target class).
- :class:`JacobianExtraction`: model extraction (Papernot et al. 2017, Jacobian-based dataset
  augmentation): from a few seed images, query the victim for labels, train a substitute,
  and step every known point along the sign of the substitute's gradient to make new queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynray.errors import ConfigError

__all__ = ["exit_loss", "fgsm", "pgd", "flip_labels", "add_backdoor", "JacobianExtraction"]


def exit_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over exits of the mean cross-entropy (the model returns one logit tensor per exit)."""
    outs = model(x)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return sum(F.cross_entropy(o, y) for o in outs)


def _check_eps(eps: float) -> None:
    if not 0 < eps <= 1:
        raise ConfigError("eps must be within (0, 1] on [0, 1] inputs", got=eps, fix="e.g. eps=0.1")


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` that raises the loss, clipped to [0, 1]."""
    _check_eps(eps)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(exit_loss(model, x, y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 20, alpha: float | None = None,
        seed: int = 0) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball of radius ``eps``, from a random start."""
    _check_eps(eps)
    alpha = alpha if alpha is not None else 2.5 * eps / steps
    g = torch.Generator().manual_seed(seed)
    adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(exit_loss(model, adv, y), adv)
        adv = torch.min(torch.max(adv + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def flip_labels(labels: torch.Tensor, frac: float, num_classes: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``frac`` of the samples another label, drawn uniformly: (poisoned labels, flipped indices)."""
    if not 0 < frac < 1:
        raise ConfigError("frac must be within (0, 1)", got=frac, fix="e.g. frac=0.1")
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    idx = torch.randperm(n, generator=g)[: int(round(frac * n))].sort().values
    shift = torch.randint(1, num_classes, (len(idx),), generator=g)
    out = labels.clone()
    out[idx] = (labels[idx] + shift) % num_classes
    return out, idx


def add_backdoor(images: torch.Tensor, labels: torch.Tensor, frac: float, target: int, *, size: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp a white ``size`` x ``size`` square in the bottom-right corner of ``frac`` of the
    samples not of class ``target`` and relabel them ``target``: (images, labels, poisoned indices)."""
    if not 0 < frac < 1:
        raise ConfigError("frac must be within (0, 1)", got=frac, fix="e.g. frac=0.05")
    g = torch.Generator().manual_seed(seed)
    pool = torch.nonzero(labels != target).flatten()
    idx = pool[torch.randperm(len(pool), generator=g)[: int(round(frac * len(labels)))]].sort().values
    x, y = images.clone(), labels.clone()
    x[idx, :, -size - 1 : -1, -size - 1 : -1] = 1.0
    y[idx] = target
    return x, y, idx


def _substitute(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c = input_shape[0]
    return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(64), nn.ReLU(), nn.Linear(64, num_classes))


@dataclass
class JacobianExtraction:
    """Papernot et al.'s substitute training against a label oracle (the victim over HTTP or in process).

    ``oracle(x) -> labels`` is the only access to the victim; every call is counted in
    ``queries``. Each round labels the new points, retrains the substitute on all of them and
    doubles the set with ``x + lam * sign(d substitute[label] / dx)``.
    """

    oracle: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int = 10
    lam: float = 0.1
    epochs: int = 10
    min_steps: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        self.queries = 0
        self.substitute: nn.Module | None = None

    def _label(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += len(x)
        return self.oracle(x)

    def _fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        torch.manual_seed(self.seed)
        net = _substitute(tuple(x.shape[1:]), self.num_classes)
        net(x[:1])  # materialise the lazy layer
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(max(self.epochs * -(-len(x) // 64), self.min_steps)):  # few points early on: still enough steps to fit them
            b = torch.randint(0, len(x), (min(64, len(x)),), generator=g)
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
        self.substitute = net.eval()

    def rounds(self, seed_images: torch.Tensor, n_rounds: int):
        """Yield ``(new queries, their labels)`` round by round (the seeds first)."""
        x = seed_images.clone()
        y = self._label(x)
        yield x, y
        for r in range(n_rounds):
            self._fit(x, y)
            xr = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                picked = self.substitute(xr).gather(1, y[:, None]).sum()
                (grad,) = torch.autograd.grad(picked, xr)
            step = self.lam if r % 2 == 0 else -self.lam  # Papernot's periodic step size keeps new points near the boundary
            new = (x + step * grad.sign()).clamp(0, 1).detach()
            ny = self._label(new)
            yield new, ny
            x, y = torch.cat([x, new]), torch.cat([y, ny])
        self._fit(x, y)
