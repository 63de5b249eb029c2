"""Cached per-sample exit outputs of a registered model, the router's training data.

The routing environment replays a model's real exit outputs (every exit's logits and the
complexity features of every sample of a split), computed once by
:func:`write_exit_cache`. Layout: ``$DYNRAY_HOME/cache/<name>/v<N>/<split>.safetensors``,
tied to the exact model version (its weights digest is stored with the cache and checked).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dynray.data import load_dataset
from dynray.errors import DatasetNotFoundError, IntegrityError
from dynray.evaluation import ExitRecords, collect_exit_outputs
from dynray.registry import ModelInfo, ModelRegistry
from dynray.store import StoredModel

__all__ = ["SPLITS", "cache_path", "write_exit_cache", "load_exit_cache", "ensure_exit_caches", "load_records"]
SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def cache_path(home: Path, info: ModelInfo, split: str) -> Path:
    return home / "cache" / info.name / f"v{info.version}" / f"{split}.safetensors"


def _digest(info: ModelInfo) -> str:
    return next(iter(sorted(info.meta.get("files", {}).items())), ("", ""))[1]


def write_exit_cache(registry: ModelRegistry, stored: StoredModel, split: str, *, data_root: str | None = None) -> Path:
    """Run every exit of ``stored`` on ``split`` once and save the outputs."""
    data = load_dataset(stored.dataset, split, root=data_root)
    rec = collect_exit_outputs(stored.model, data.images, data.labels)
    path = cache_path(registry.home, stored.info, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logits": rec.logits.contiguous(), "complexity": rec.complexity.contiguous(), "labels": rec.labels.contiguous(),
               "cum_macs": rec.cum_macs.contiguous(), "full_macs": torch.tensor([rec.full_macs])},
              str(tmp), metadata={"model": stored.info.ref, "weights_sha256": _digest(stored.info), "split": split})
    tmp.replace(path)
    log.info("cached exit outputs of %s on %s (%d samples) at %s", stored.info.ref, split, len(data), path)
    return path


def load_exit_cache(registry: ModelRegistry, ref: str | None, split: str) -> tuple[ModelInfo, ExitRecords]:
    """The cached exit outputs of model ``ref`` on ``split``; a clear error if missing or stale."""
    info = registry.resolve(ref)
    path = cache_path(registry.home, info, split)
    if not path.is_file():
        raise DatasetNotFoundError(f"no cached exit outputs of {info.ref} on {split}", got=str(path),
                                   fix=f"create them with `dynray router cache --model {info.ref} --split {split}` (`dynray router train` does it too)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("weights_sha256") != _digest(info):
        raise IntegrityError(f"cached exit outputs at {path} belong to other weights than {info.ref}", got=meta.get("model"),
                             fix=f"rebuild them: dynray router cache --model {info.ref} --split {split}")
    t = load_file(str(path))
    return info, ExitRecords(logits=t["logits"], complexity=t["complexity"], labels=t["labels"], cum_macs=t["cum_macs"], full_macs=int(t["full_macs"][0]))


def ensure_exit_caches(registry: ModelRegistry, ref: str | None, splits: tuple[str, ...] = SPLITS) -> None:
    """Cache the exit outputs of every split of ``ref`` that has none yet."""
    from dynray.store import load_model

    stored = None
    info = registry.resolve(ref)
    for split in splits:
        if not cache_path(registry.home, info, split).is_file():
            stored = stored or load_model(registry, info.ref)
            write_exit_cache(registry, stored, split)


def load_records(registry: ModelRegistry, ref: str | None, splits: tuple[str, ...]) -> ExitRecords:
    """The cached exit outputs of several splits of ``ref``, concatenated sample-wise."""
    parts = [load_exit_cache(registry, ref, s)[1] for s in splits]
    if len(parts) == 1:
        return parts[0]
    return ExitRecords(logits=torch.cat([p.logits for p in parts], 1), complexity=torch.cat([p.complexity for p in parts]),
                       labels=torch.cat([p.labels for p in parts]), cum_macs=parts[0].cum_macs, full_macs=parts[0].full_macs)
