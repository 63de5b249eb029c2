"""The architecture search space: candidates, sampling, the vector encoding and the builder.

A :class:`Candidate` is one point of the space: a DynamicNet architecture (stages, widths,
layers and kernel size per stage, exit-head size, an optional MoE last stage) plus its
training hyperparameters (learning rate, weight decay). Exits sit after every stage, so the
*exit positions* are searched through the stage boundaries: ``layers`` splits the network's
depth into stages, and each stage ends at an exit.

Every candidate encodes to a fixed-length vector in [0, 1]^D (:meth:`SearchSpace.encode`) and
back (:meth:`SearchSpace.decode`). Genes of stages a candidate does not use are kept in the
vector (latent genes), so crossover and mutation can switch a stage on with sensible values.
Categorical genes round-trip exactly; log-scale genes are kept to 3 significant digits, so
every decoded candidate round-trips exactly.

Tune needs plain dicts: :meth:`Candidate.to_dict` is what a searcher suggests and
:meth:`Candidate.from_dict` is the first line of the trainable.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from dynray.errors import ConfigError
from dynray.models.config import DynamicNetConfig
from dynray.models.gating import MoEConfig

__all__ = ["Candidate", "SearchSpace", "default_candidate"]


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One architecture and its training hyperparameters."""

    num_stages: int = 3
    """Stages (= exits) of the network."""
    widths: tuple[int, ...] = (16, 32, 64)
    """Channels per stage; entries past ``num_stages`` are latent genes."""
    layers: tuple[int, ...] = (1, 1, 2)
    """Conv layers per stage (the stage boundaries, hence the exit positions)."""
    kernels: tuple[int, ...] = (3, 3, 3)
    """Kernel size per stage (the stem's first conv keeps the default 5x5)."""
    exit_hidden: int = 64
    """Hidden units of the early exit heads (0: one linear layer)."""
    moe: bool = False
    """The last stage ends in a mixture-of-experts block."""
    experts: int = 4
    """Routed experts of that block (when ``moe``)."""
    top_k: int = 1
    """Experts each sample uses (when ``moe``)."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 5e-4
    """AdamW weight decay."""

    def to_dict(self) -> dict:
        """A JSON/Tune-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        """Inverse of :meth:`to_dict`; unknown keys are refused with the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError("unknown candidate genes", got=sorted(unknown), fix=f"valid genes: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def model_config(self, base: DynamicNetConfig) -> DynamicNetConfig:
        """The DynamicNet this candidate describes, on ``base``'s input shape and classes.

        Every stage but the last halves the resolution with a strided first conv (the
        foundation default's layout, (2, 2, 1) for three stages).
        """
        k = self.num_stages
        moe = None
        if self.moe:
            moe = MoEConfig(stages=(k - 1,), num_experts=self.experts, top_k=self.top_k, gate="noisy_topk")
        return replace(
            base,
            widths=self.widths[:k],
            layers=self.layers[:k],
            kernel_sizes=self.kernels[:k],
            strides=(2,) * (k - 1) + (1,),
            exit_hidden=self.exit_hidden,
            moe=moe,
        )

    def describe(self) -> str:
        """A short one-line summary for tables and plots."""
        k = self.num_stages
        arch = " ".join(f"{w}x{n}k{ks}" for w, n, ks in zip(self.widths[:k], self.layers[:k], self.kernels[:k], strict=True))
        moe = f" moe{self.experts}top{self.top_k}" if self.moe else ""
        return f"[{arch}] h{self.exit_hidden}{moe} lr{self.lr:.1e} wd{self.weight_decay:.0e}"


def default_candidate(max_stages: int = 4) -> Candidate:
    """The foundation's default DynamicNet (widths 16-32-64, layers 1-1-2, 3x3) with its
    default training hyperparameters, padded with latent genes to ``max_stages``."""
    pad = max(0, max_stages - 3)
    return Candidate(widths=(16, 32, 64) + (64,) * pad, layers=(1, 1, 2) + (1,) * pad, kernels=(3,) * (3 + pad))


def _check_choices(name: str, values: tuple, *, minimum: int = 1) -> None:
    if not values:
        raise ConfigError(f"the search space's {name} choices are empty", got=values, fix=f"give at least one value for {name}")
    if len(set(values)) != len(values):
        raise ConfigError(f"the search space's {name} choices repeat a value", got=values, fix="list each value once")
    if min(values) < minimum:
        raise ConfigError(f"the search space's {name} choices must be >= {minimum}", got=values, fix=f"remove values below {minimum}")


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """What the search may vary. Every field is a set of choices (or a range)."""

    stages: tuple[int, ...] = (2, 3, 4)
    """Choices for the number of stages (= exits)."""
    widths: tuple[tuple[int, ...], ...] = ((8, 12, 16, 24), (16, 24, 32, 48), (32, 48, 64))
    """Choices for each stage's channels, per stage (stages past the list use its last
    entry): early stages run at high resolution, so they get the narrow choices."""
    layers: tuple[int, ...] = (1, 2, 3)
    """Choices for each stage's conv layers."""
    kernels: tuple[int, ...] = (3, 5)
    """Choices for each stage's kernel size (odd)."""
    exit_hidden: tuple[int, ...] = (0, 32, 64)
    """Choices for the early exit heads' hidden units."""
    moe: tuple[bool, ...] = (False, True)
    """Whether the last stage may be an MoE stage: (False,), (True,) or both."""
    experts: tuple[int, ...] = (2, 4)
    """Choices for the routed experts of an MoE stage."""
    top_k: tuple[int, ...] = (1, 2)
    """Choices for the experts each sample uses."""
    lr: tuple[float, float] = (1e-3, 1e-2)
    """Learning-rate range, sampled log-uniformly."""
    weight_decay: tuple[float, float] = (1e-5, 1e-3)
    """Weight-decay range, sampled log-uniformly."""

    def __post_init__(self) -> None:
        _check_choices("stages", self.stages, minimum=2)
        if not self.widths:
            raise ConfigError("the search space's widths are empty", got=self.widths, fix="give one tuple of width choices per stage, e.g. ((8, 16), (16, 32), (32, 64))")
        for k, w in enumerate(self.widths):
            _check_choices(f"widths[{k}]", tuple(w))
        _check_choices("layers", self.layers)
        _check_choices("kernels", self.kernels)
        _check_choices("exit_hidden", self.exit_hidden, minimum=0)
        if any(k % 2 == 0 for k in self.kernels):
            raise ConfigError("kernel sizes must be odd", got=self.kernels, fix="use e.g. (3, 5)")
        if not self.moe or len(set(self.moe)) != len(self.moe):
            raise ConfigError("the search space's moe choices must be (False,), (True,) or (False, True)", got=self.moe, fix="use (False, True)")
        if True in self.moe:
            _check_choices("experts", self.experts, minimum=2)
            _check_choices("top_k", self.top_k)
            if max(self.top_k) > min(self.experts):
                raise ConfigError(
                    "contradictory search space: a top_k choice exceeds an experts choice",
                    got={"experts": self.experts, "top_k": self.top_k},
                    fix=f"keep top_k choices <= {min(self.experts)} or drop the smaller experts choices",
                )
        for name in ("lr", "weight_decay"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"the search space's {name} range must satisfy 0 < low <= high", got=(lo, hi), fix=f"e.g. {name}=({lo if lo > 0 else 1e-4}, {max(hi, lo, 1e-4)})")

    @property
    def max_stages(self) -> int:
        return max(self.stages)

    def stage_widths(self, k: int) -> tuple[int, ...]:
        """Width choices of stage ``k`` (0-based)."""
        return tuple(sorted(self.widths[min(k, len(self.widths) - 1)]))

    # -- genes: one entry per vector coordinate -------------------------------------------
    def _genes(self) -> list[tuple[str, int | None, tuple | None]]:
        """(field, stage index or None, choices or None for log-uniform ranges)."""
        genes: list[tuple[str, int | None, tuple | None]] = [("num_stages", None, tuple(sorted(self.stages)))]
        genes += [("widths", i, self.stage_widths(i)) for i in range(self.max_stages)]
        for per_stage in ("layers", "kernels"):
            genes += [(per_stage, i, tuple(sorted(getattr(self, per_stage)))) for i in range(self.max_stages)]
        genes += [("exit_hidden", None, tuple(sorted(self.exit_hidden))), ("moe", None, tuple(sorted(self.moe)))]
        genes += [("experts", None, tuple(sorted(self.experts))), ("top_k", None, tuple(sorted(self.top_k)))]
        genes += [("lr", None, None), ("weight_decay", None, None)]
        return genes

    @property
    def dim(self) -> int:
        """Length of the encoding vector."""
        return len(self._genes())

    def gene_choices(self) -> list[int | None]:
        """Per coordinate: how many choices the gene has, or None for a log-uniform range."""
        return [None if choices is None else len(choices) for _, _, choices in self._genes()]

    def gene_names(self) -> list[str]:
        return [f"{name}[{i}]" if i is not None else name for name, i, _ in self._genes()]

    def encode(self, c: Candidate) -> np.ndarray:
        """Candidate -> [dim] float vector in [0, 1] (choice index scaled, or log position)."""
        self.check(c)
        out = []
        for name, i, choices in self._genes():
            v = getattr(c, name)
            v = v[i] if i is not None else v
            if choices is None:
                lo, hi = getattr(self, name)
                out.append(0.0 if hi == lo else (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)))
            else:
                out.append(choices.index(v) / max(1, len(choices) - 1))
        return np.asarray(out, dtype=np.float64)

    def decode(self, vec: np.ndarray) -> Candidate:
        """[dim] vector -> the nearest candidate (each coordinate clipped to [0, 1])."""
        vec = np.clip(np.asarray(vec, dtype=np.float64), 0.0, 1.0)
        if vec.shape != (self.dim,):
            raise ConfigError("encoding vector has the wrong length", got=vec.shape, fix=f"give {self.dim} values ({', '.join(self.gene_names())})")
        values: dict[str, object] = {}
        per_stage: dict[str, list] = {"widths": [], "layers": [], "kernels": []}
        for x, (name, i, choices) in zip(vec, self._genes(), strict=True):
            if choices is None:
                lo, hi = getattr(self, name)
                # 3 significant digits, so decode(encode(c)) == c for every decoded candidate
                v: object = float(f"{math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo))):.3g}")
            else:
                v = choices[int(round(x * (len(choices) - 1)))]
            if i is not None:
                per_stage[name].append(v)
            else:
                values[name] = v
        return Candidate(**values, **{k: tuple(v) for k, v in per_stage.items()})  # type: ignore[arg-type]

    def sample(self, rng: random.Random) -> Candidate:
        """A uniformly random candidate (choices uniform, ranges log-uniform)."""
        return self.decode(np.asarray([rng.random() for _ in range(self.dim)]))

    def check(self, c: Candidate) -> None:
        """Refuse a candidate outside this space, naming the gene."""
        ms = self.max_stages
        if len(c.widths) != ms or len(c.layers) != ms or len(c.kernels) != ms:
            raise ConfigError("candidate's per-stage genes do not match the space", got={"widths": c.widths, "layers": c.layers, "kernels": c.kernels}, fix=f"give {ms} values each")
        for name, i, choices in self._genes():
            v = getattr(c, name)
            v = v[i] if i is not None else v
            if choices is not None and v not in choices:
                label = f"{name}[{i}]" if i is not None else name
                raise ConfigError(f"candidate gene {label} is outside the search space", got=v, fix=f"use one of {choices}")
            if choices is None:
                lo, hi = getattr(self, name)
                if not lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
                    raise ConfigError(f"candidate gene {name} is outside the search space", got=v, fix=f"use a value in [{lo}, {hi}]")

    def contains_default(self) -> bool:
        """Whether the foundation's default candidate is a point of this space."""
        try:
            self.check(default_candidate(self.max_stages))
        except ConfigError:
            return False
        return True

    def tune_space(self) -> dict:
        """The same space as Ray Tune sample domains, for random search (BasicVariantGenerator).

        Sampled dicts go through :meth:`Candidate.from_dict` like every other searcher's.
        """
        from ray import tune

        ms = self.max_stages
        return {
            "num_stages": tune.choice(sorted(self.stages)),
            "widths": [tune.choice(self.stage_widths(k)) for k in range(ms)],
            "layers": [tune.choice(sorted(self.layers)) for _ in range(ms)],
            "kernels": [tune.choice(sorted(self.kernels)) for _ in range(ms)],
            "exit_hidden": tune.choice(sorted(self.exit_hidden)),
            "moe": tune.choice(sorted(self.moe)),
            "experts": tune.choice(sorted(self.experts)),
            "top_k": tune.choice(sorted(self.top_k)),
            "lr": tune.loguniform(*self.lr),
            "weight_decay": tune.loguniform(*self.weight_decay),
        }
