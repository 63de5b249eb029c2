"""Ray job: the "federated" bench section: FedAvg over device actors vs centralised training,
compressed vs dense updates, secure vs plain aggregation, over seeds.

    python -m jobs.bench_federated --dataset mnist-5k --json out/bench.json
    dynray bench federated --dataset mnist-5k --json out/bench.json

Per seed: the centralised baseline (same model and recipe, all the training data, as many
epochs as a client makes in all rounds), FedAvg with dense updates, with the compressed codec
(top-k with error feedback by default) and with int8 updates, each over the same Dirichlet
split; and one round with secure aggregation next to the same round in plain, from the same
weights, whose averages are compared. Trains from scratch: needs no registered model.
Writes the accuracy-against-bytes plot next to the JSON (or to --plot).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import tyro

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.federated import central_accuracy, plot_bytes, seed_row, summarize
from dynray.data import load_dataset
from dynray.errors import ConfigError
from dynray.federated.codec import CodecSpec
from dynray.federated.server import FedConfig
from dynray.flags import guarded, parse, setup_logging
from dynray.models.defaults import default_model_config
from dynray.training import TrainConfig
from actors.federated import run_federated
from jobs._ray import connect

__all__ = ["Config", "run", "main"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """FedAvg vs centralised, compressed vs dense updates, secure vs plain aggregation; merge the "federated" section."""

    fed: Annotated[FedConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=lambda: FedConfig(rounds=20, local_epochs=2, codec=CodecSpec(kind="topk", topk_frac=0.1)))
    """The federated runs; its codec is the compressed one, run next to dense updates (and int8)."""
    int8: bool = True
    """Also run int8 updates (with error feedback)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One split, initial model and data order per seed."""
    lr: float = TrainConfig.lr
    """Peak learning rate, the clients' and the centralised baseline's."""
    data_root: str | None = None
    """Dataset root; None = $DYNRAY_DATA."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("the federated bench needs at least one seed", got=self.seeds, fix="e.g. --seeds 0 1 2")
        if self.fed.codec.kind == "dense":
            raise ConfigError("--kind must name a compressing codec (dense updates are always run beside it)", got="dense", fix="e.g. --kind topk --topk-frac 0.1")


def _max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].is_floating_point() and sa[k].numel())


def run(cfg: Config) -> BenchResult:
    check_bench_file(cfg.json)
    connect()
    dataset = cfg.dataset or "mnist-5k"
    train, test = load_dataset(dataset, "train", root=cfg.data_root), load_dataset(dataset, "test", root=cfg.data_root)
    model = default_model_config(dataset)
    recipe = TrainConfig(dataset=dataset, lr=cfg.lr, workers=1, data_root=cfg.data_root)
    codecs = {"dense": CodecSpec(kind="dense"), cfg.fed.codec.kind: cfg.fed.codec}
    if cfg.int8 and cfg.fed.codec.kind != "int8":
        codecs["int8"] = CodecSpec(kind="int8")
    rows = []
    for seed in cfg.seeds:
        fed = dataclasses.replace(cfg.fed, seed=seed, secure_agg=False)
        central = central_accuracy(model, train, test, dataclasses.replace(recipe, seed=seed, epochs=fed.rounds * fed.local_epochs))
        log.info("seed %d: centralised %d epochs: test accuracy %.4f", seed, fed.rounds * fed.local_epochs, central)
        runs = {}
        for name, codec in codecs.items():
            out = run_federated(dataclasses.replace(fed, codec=codec), dataset=dataset, model=model, recipe=recipe, test=test, data_root=cfg.data_root)
            runs[name] = [r.to_dict() for r in out.records]
            log.info("seed %d: FedAvg with %s updates: test accuracy %.4f, %.2f MB up", seed, name, out.records[-1].accuracy, out.bytes_up / 1e6)
        one = dataclasses.replace(fed, rounds=1, codec=CodecSpec(kind="dense"))
        plain = run_federated(one, dataset=dataset, model=model, recipe=recipe, test=None, data_root=cfg.data_root)
        secure = run_federated(dataclasses.replace(one, secure_agg=True), dataset=dataset, model=model, recipe=recipe, test=None, data_root=cfg.data_root)
        diff = _max_abs_diff(plain.model, secure.model)
        log.info("seed %d: secure aggregation vs plain, one round from the same weights: max |difference| %.3g", seed, diff)
        rows.append(seed_row(seed, central, runs, diff))
    config = {**dataclasses.asdict(cfg.fed), "lr": cfg.lr}
    section = {"dataset": dataset, "n_test": len(test), **summarize(rows, compressed=cfg.fed.codec.kind, config=config)}
    section["plot"] = plot_bytes(section, cfg.plot or str(Path(cfg.json).with_name("federated_bytes.png")))
    merge_section(cfg.json, "federated", section)
    return BenchResult("federated", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_federated") -> int:
    print(run(parse(Config, argv, prog=prog, description=__doc__)).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_federated"))
