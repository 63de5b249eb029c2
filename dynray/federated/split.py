"""Non-IID client shards: each class's samples divided among clients in Dirichlet proportions.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification" (2019): for every class, client shares ``p ~ Dir(alpha)``; a small
``alpha`` gives each client a few dominant classes, a large one approaches an IID split.
"""

from __future__ import annotations

import numpy as np
import torch

from dynray.errors import ConfigError

__all__ = ["dirichlet_split", "label_histogram"]


def dirichlet_split(labels: torch.Tensor, clients: int, *, alpha: float, seed: int, min_size: int = 10, max_tries: int = 100) -> list[torch.Tensor]:
    """Indices of ``labels`` for each of ``clients``, disjoint and covering every sample.

    Redraws (up to ``max_tries``) until every client holds at least ``min_size`` samples.
    """
    if clients < 1:
        raise ConfigError("a federated split needs at least one client", got=clients, fix="e.g. --clients 4")
    if alpha <= 0:
        raise ConfigError("the Dirichlet concentration must be positive", got=alpha, fix="e.g. --alpha 0.5 (smaller = less alike clients)")
    y = labels.cpu().numpy()
    if len(y) < clients * min_size:
        raise ConfigError("too few samples for that many clients", got={"samples": len(y), "clients": clients, "min_size": min_size}, fix="use fewer clients")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return [torch.from_numpy(s).long() for s in shards]
    raise ConfigError("no Dirichlet split gave every client enough samples", got={"alpha": alpha, "clients": clients, "min_size": min_size}, fix="raise --alpha or use fewer clients")


def label_histogram(labels: torch.Tensor, shards: list[torch.Tensor], num_classes: int) -> list[list[int]]:
    """Samples of each class per client: how non-IID the split is."""
    return [torch.bincount(labels[s], minlength=num_classes).tolist() for s in shards]
