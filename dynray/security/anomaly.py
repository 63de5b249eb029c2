"""Detectors: adversarial inputs, poisoned training data, model-extraction clients.

- :class:`AdversarialDetector` (feature squeezing, Xu et al. 2018, plus the early exits'
  disagreement): an input whose answer moves when it is squeezed to a lower bit depth, or
  whose exits disagree, scores high; a logistic regression fitted on clean and attacked
  inputs weighs the signals. The threshold is held-out clean data's ``1 - fpr`` quantile,
  so the false-positive rate is set, not hoped for.
- :func:`audit_labels` (out-of-fold probabilities, as in confident learning, Northcutt et
  al. 2021): a sample whose out-of-fold prediction is clearly another class than its label
  is flagged as mislabelled; :func:`audit_backdoor` (activation clustering, Chen
  et al. 2019): a class whose penultimate activations split into a small, well-separated
  cluster has that cluster flagged as trigger-poisoned.
- :class:`ExtractionDetector`: per API key, over its latest queries, the share of queries
  that are small perturbations of the key's earlier queries (what Jacobian-based
  augmentation and other synthetic-query attacks send; cf. PRADA, Juuti et al. 2019; exact
  repeats, i.e. retries, do not count) and, optionally, the share of answers near a decision
  boundary.

Every detector returns flags; what happens on a flag (log, throttle, block) is the caller's
:class:`FlagAction`, and :class:`Flag` is what goes to the logs and metrics.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynray.errors import ConfigError

__all__ = ["FLAG_ACTIONS", "FlagAction", "Flag", "squeeze_bits", "AdversarialDetector", "audit_labels", "audit_backdoor",
           "AuditResult", "ExtractionConfig", "ExtractionDetector", "exit_probs", "train_audit_model"]

FLAG_ACTIONS = ("log", "throttle", "block")
FlagAction = Literal["log", "throttle", "block"]


@dataclass(frozen=True)
class Flag:
    """One detector's alarm: to the logs, to ``dynray_security_flags_total`` and to the action."""

    detector: str
    """``adversarial``, ``extraction``, ``poisoning``."""
    subject: str
    """What was flagged: a key id, a request id, a sample index."""
    score: float
    reason: str
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"detector": self.detector, "subject": self.subject, "score": round(self.score, 4), "reason": self.reason, "at": self.at}


# -- adversarial inputs -------------------------------------------------------------------

def squeeze_bits(x: torch.Tensor, bits: int = 1) -> torch.Tensor:
    """Reduce [0, 1] inputs to ``bits`` bits of depth."""
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def exit_probs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Softmax of every exit, without gradients."""
    with torch.no_grad():
        outs = model(x)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return [torch.softmax(o, dim=1) for o in outs]


class AdversarialDetector:
    """Feature squeezing and exit disagreement on ``model`` (a module returning one logit
    tensor per exit); :meth:`calibrate` on clean data sets the threshold.

    Signals (L1 distances between softmax outputs, and confidence gaps): the last exit on
    the raw input vs its 1-bit and 2-bit squeezes, the first exit raw vs squeezed, the first
    and the middle exit vs the last, and one minus the first and the last exit's top
    probability. Unfitted, the score is ``bits1 + exits`` (no attack seen). :meth:`fit`
    learns a logistic regression over all of them from clean inputs and attacked ones (say,
    FGSM at a few eps); :meth:`calibrate` then sets its threshold on *other* clean inputs.
    """

    SIGNALS = ("bits1", "bits2", "bits1_first", "exits", "exits_mid", "unsure_last", "unsure_first")

    def __init__(self, model: nn.Module, *, threshold: float | None = None, batch: int = 256) -> None:
        self.model, self.threshold, self.batch = model.eval(), threshold, batch
        self.classifier = None

    def signals(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample signals, each within [0, 2]."""
        out: dict[str, list[torch.Tensor]] = {s: [] for s in self.SIGNALS}
        for i in range(0, len(x), self.batch):
            xb = x[i : i + self.batch]
            raw, sq1, sq2 = exit_probs(self.model, xb), exit_probs(self.model, squeeze_bits(xb, 1)), exit_probs(self.model, squeeze_bits(xb, 2))
            mid = raw[len(raw) // 2] if len(raw) > 2 else raw[0]
            for name, v in (("bits1", (raw[-1] - sq1[-1]).abs().sum(1)), ("bits2", (raw[-1] - sq2[-1]).abs().sum(1)),
                            ("bits1_first", (raw[0] - sq1[0]).abs().sum(1)), ("exits", (raw[0] - raw[-1]).abs().sum(1)),
                            ("exits_mid", (mid - raw[-1]).abs().sum(1)), ("unsure_last", 1 - raw[-1].max(1).values),
                            ("unsure_first", 1 - raw[0].max(1).values)):
                out[name].append(v)
        return {s: torch.cat(v) for s, v in out.items()}

    def _matrix(self, x: torch.Tensor):
        return torch.stack(list(self.signals(x).values()), dim=1).double().numpy()

    def fit(self, clean: torch.Tensor, attacked: torch.Tensor) -> AdversarialDetector:
        """Learn how the signals combine from ``clean`` and ``attacked`` inputs (then :meth:`calibrate`)."""
        from sklearn.linear_model import LogisticRegression

        xc, xa = self._matrix(clean), self._matrix(attacked)
        self.classifier = LogisticRegression(max_iter=2000).fit(np.concatenate([xc, xa]), np.r_[np.zeros(len(xc)), np.ones(len(xa))])
        self.threshold = None  # a new score needs a new threshold
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample score: the fitted classifier's log-odds, else ``bits1 + exits``."""
        if self.classifier is not None:
            return torch.from_numpy(self.classifier.decision_function(self._matrix(x))).float()
        s = self.signals(x)
        return s["bits1"] + s["exits"]

    def calibrate(self, clean: torch.Tensor, fpr: float = 0.05) -> float:
        """Set the threshold so that ``fpr`` of ``clean`` is flagged; returns it."""
        if not 0 < fpr < 1:
            raise ConfigError("fpr must be within (0, 1)", got=fpr, fix="e.g. fpr=0.05")
        self.threshold = float(torch.quantile(self.scores(clean), 1 - fpr))
        return self.threshold

    def flag(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean per sample: score above the threshold."""
        if self.threshold is None:
            raise ConfigError("the detector has no threshold", fix="call calibrate(clean_images) first, or pass threshold=")
        return self.scores(x) > self.threshold


# -- poisoned training data ---------------------------------------------------------------

@dataclass(frozen=True)
class AuditResult:
    """Which training samples look poisoned, and why."""

    flagged: np.ndarray
    """Sorted indices into the audited set."""
    method: str
    n: int
    detail: dict = field(default_factory=dict)

    def precision_recall(self, truth: np.ndarray) -> tuple[float, float]:
        """Against the indices that really were poisoned."""
        f, t = set(self.flagged.tolist()), set(np.asarray(truth).tolist())
        hit = len(f & t)
        return (hit / len(f) if f else 0.0), (hit / len(t) if t else 1.0)


def train_audit_model(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int, seed: int, augment: bool = True) -> nn.Module:
    """A default DynamicNet trained in process by the product's own epoch loop (no Ray)."""
    from dynray.data import Split
    from dynray.models import DynamicNetConfig, build
    from dynray.training import TrainConfig, make_optimizer, train_epoch

    torch.manual_seed(seed)
    model = build(DynamicNetConfig(input_shape=tuple(x.shape[1:]), num_classes=num_classes))
    cfg = TrainConfig(epochs=epochs, seed=seed, augment=augment)
    opt = make_optimizer(model, cfg)
    data = Split("audit", "train", x, y, num_classes)
    steps = 0
    for epoch in range(epochs):
        steps += train_epoch(model, model, data, opt, cfg, epoch, step0=steps)["steps"]
    return model.eval()


def audit_labels(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, folds: int = 2, epochs: int = 6, margin: float = 0.35,
                 seed: int = 0, progress=None) -> AuditResult:
    """Out-of-fold label audit (confident learning's idea, Northcutt et al. 2021): train on all
    folds but one, predict the held-out one, so no sample is scored by a model that saw it.
    Sample ``i`` is flagged when its out-of-fold prediction ``j`` is not its label and
    ``p_ij - p_i,label >= margin``. (``margin`` 0.35 was chosen on mnist-5k with 10% random
    flips, seeds 0-2: precision 0.88-0.93, recall 0.89-0.95.)"""
    if folds < 2:
        raise ConfigError("the audit needs at least 2 folds (a model never scores data it trained on)", got=folds, fix="e.g. folds=2")
    if not 0 <= margin < 1:
        raise ConfigError("margin must be within [0, 1)", got=margin, fix="e.g. margin=0.35")
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    fold = torch.randperm(n, generator=g) % folds
    probs = torch.zeros(n, num_classes)
    for k in range(folds):
        train, held = fold != k, fold == k
        model = train_audit_model(images[train], labels[train], num_classes, epochs=epochs, seed=seed + k)
        probs[held] = exit_probs(model, images[held])[-1]
        if progress is not None:
            progress(k + 1, folds)
    rows = torch.arange(n)
    pred = probs.argmax(1)
    gap = probs[rows, pred] - probs[rows, labels]
    flagged = (pred != labels) & (gap >= margin)
    return AuditResult(np.flatnonzero(flagged.numpy()), "out-of-fold-margin", n,
                       {"folds": folds, "epochs": epochs, "margin": margin, "out_of_fold_disagreement": round(float((pred != labels).float().mean()), 4)})


def audit_backdoor(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, max_share: float = 0.35,
                   min_silhouette: float = 0.4, seed: int = 0) -> AuditResult:
    """Activation clustering on a model trained on the (possibly poisoned) data: per class,
    2-means on the PCA-reduced input of the last exit's classifier; a cluster holding under
    ``max_share`` of the class, with a silhouette of at least ``min_silhouette``, is flagged.
    (On mnist-5k with a 5% corner-trigger backdoor, seeds 0-2, the target class split at
    silhouette 0.51-0.56 and clean classes at most 0.30: hence 0.4.)"""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    feats: list[torch.Tensor] = []
    head = model.exits[-1]
    hook = head.register_forward_hook(lambda m, inp, out: feats.append(torch.flatten(inp[0], 1).detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(images), 256):
                model(images[i : i + 256])
    finally:
        hook.remove()
    acts = torch.cat(feats).numpy()
    flagged, per_class = [], {}
    for c in range(num_classes):
        idx = np.flatnonzero(labels.numpy() == c)
        if len(idx) < 20:
            continue
        z = PCA(n_components=min(10, len(idx) - 1), random_state=seed).fit_transform(acts[idx])
        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
        sizes = np.bincount(km.labels_, minlength=2)
        small = int(sizes.argmin())
        share, sil = sizes[small] / len(idx), float(silhouette_score(z, km.labels_))
        per_class[c] = {"small_share": round(float(share), 4), "silhouette": round(sil, 4)}
        if share < max_share and sil >= min_silhouette:
            flagged.extend(idx[km.labels_ == small].tolist())
    return AuditResult(np.array(sorted(flagged), dtype=int), "activation-clustering", len(labels), {"classes": per_class})


# -- model extraction ---------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractionConfig:
    """The per-key extraction detector's window and thresholds."""

    window: int = 256
    """Latest queries per key the shares are taken over (and the earlier inputs compared against)."""
    min_queries: int = 64
    """No verdict before a key has sent this many."""
    margin: float = 0.5
    """An answer whose top-two probabilities are closer than this is near a boundary."""
    boundary_share: float | None = None
    """Flag when more of the window than this is near a boundary (None: off). Off by default:
    the share is absolute and depends on the model. Normal clients of the demo's 20-epoch
    model stay under 16%, but a 1-epoch mnist-5k model answers 89% of clean test images
    within 0.5 of a boundary, and a limit of 0.35 flagged every normal client of it..."""
    near: float = 0.12
    """...or when more than ``perturbed_share`` of the queries are within this RMS pixel
    distance of an earlier query of the same key (and not an exact repeat)."""
    perturbed_share: float = 0.3
    downsample: int = 2
    """Inputs are compared average-pooled by this factor (cheaper, and robust to pixel noise)."""

    def __post_init__(self) -> None:
        if self.min_queries < 8 or self.window < self.min_queries:
            raise ConfigError("the window must hold at least min_queries >= 8 queries", got=(self.window, self.min_queries), fix="e.g. window=256, min_queries=64")


class _KeyState:
    """One key's window: its latest inputs in a ring buffer, and a verdict per query."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.buf: torch.Tensor | None = None  # [window, d] float64, made on the first query
        self.filled = self.pos = 0
        self.near_boundary: deque[bool] = deque(maxlen=window)
        self.perturbed: deque[bool] = deque(maxlen=window)
        self.total = 0
        self.flagged_at: int | None = None

    def push(self, x: torch.Tensor) -> None:
        if self.buf is None:
            self.buf = torch.zeros(self.window, x.shape[1], dtype=torch.float64)
        for row in x[-self.window :]:
            self.buf[self.pos] = row
            self.pos = (self.pos + 1) % self.window
            self.filled = min(self.filled + 1, self.window)


_REPEAT_RMS = 1e-4
"""Closer than this (RMS per pooled pixel) is the same input sent again, not a perturbation."""


class ExtractionDetector:
    """Per-key query statistics (see the module doc); :meth:`observe` after each answer.

    It runs on the ingress's event loop, so one request costs one distance matrix against the
    key's window (``B x window`` pooled inputs), not a pass per sample.
    """

    def __init__(self, cfg: ExtractionConfig = ExtractionConfig(), *, max_keys: int = 10_000) -> None:
        self.cfg, self.max_keys = cfg, max_keys
        self._keys: dict[str, _KeyState] = {}

    def observe(self, key: str, inputs: torch.Tensor, probs: torch.Tensor) -> Flag | None:
        """Record one request's ``inputs`` [B, C, H, W] and answered ``probs`` [B, K]; a Flag
        the first time the key crosses a threshold (then None while it stays flagged)."""
        cfg = self.cfg
        st = self._keys.get(key)
        if st is None:
            if len(self._keys) >= self.max_keys:
                self._keys.pop(next(iter(self._keys)))
            st = self._keys[key] = _KeyState(cfg.window)
        x = (F.avg_pool2d(inputs.float(), cfg.downsample) if cfg.downsample > 1 else inputs.float()).flatten(1).double()
        scale = x.shape[1] ** 0.5
        top2 = probs.float().topk(min(2, probs.shape[1]), dim=1).values
        margins = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
        # each query against the window so far and the earlier queries of its own request
        within = torch.cdist(x, x) / scale
        within.masked_fill_(~torch.ones_like(within, dtype=torch.bool).tril(-1), float("inf"))
        dists = torch.cat([torch.cdist(x, st.buf[: st.filled]) / scale, within], dim=1) if st.filled else within
        repeat = (dists < _REPEAT_RMS).any(dim=1)
        perturbed = ~repeat & (dists < cfg.near).any(dim=1)
        st.perturbed.extend(perturbed.tolist())
        st.near_boundary.extend((margins < cfg.margin).tolist())
        st.push(x)
        st.total += len(x)
        if st.flagged_at is not None or st.total < cfg.min_queries:
            return None
        b, p = float(np.mean(st.near_boundary)), float(np.mean(st.perturbed))
        limit_b = cfg.boundary_share if cfg.boundary_share is not None else float("inf")
        if b > limit_b or p > cfg.perturbed_share:
            st.flagged_at = st.total
            why = (f"{p:.0%} of its last {len(st.perturbed)} queries perturb earlier ones (limit {cfg.perturbed_share:.0%}); "
                   f"{b:.0%} of its answers near a boundary" + (f" (limit {limit_b:.0%})" if cfg.boundary_share is not None else ""))
            return Flag("extraction", key, max(b / limit_b, p / cfg.perturbed_share), why)
        return None

    def flagged(self, key: str) -> bool:
        st = self._keys.get(key)
        return st is not None and st.flagged_at is not None

    def queries_to_flag(self, key: str) -> int | None:
        st = self._keys.get(key)
        return None if st is None else st.flagged_at
