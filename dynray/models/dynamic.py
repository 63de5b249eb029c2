"""DynamicNet: a staged backbone with an exit head after every stage.

Inference walks the stages with **batch compaction**: after each exit the stop rule picks
the samples that are done, their logits are written out, and only the remaining samples
enter the next stage, so the compute really shrinks with the number of easy inputs.

Shape legend: B batch, b running (compacted) batch, C classes, F complexity features,
K exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from dynray.complexity import ComplexityFeatures
from dynray.errors import InputValidationError
from dynray.models.backbones import make_backbone
from dynray.models.config import DynamicNetConfig
from dynray.models.macs import MacProfile, module_macs
from dynray.models.moe import ExpertRunner, MoEBlock, MoEOutput

__all__ = ["DynamicNet", "ExitOutput", "StopRule", "StopAtExit"]


class StopRule(Protocol):
    """Decides, per sample, whether to leave at exit ``k``.

    logits: [b, C] of the running samples at exit k; complexity: [b, F] normalised
    features of the same samples; prev_pred: [b] int64 argmax of exit k-1 for the same
    samples (None at the first exit). Returns a bool mask [b]. The last exit always stops.
    A rule with ``uses_complexity = False`` gets an empty [b, 0] complexity tensor, and the
    model skips computing the features.
    """

    def stop(self, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class StopAtExit:
    """Stop rule that sends every sample to a fixed exit (``-1`` = the last one)."""

    exit: int = -1
    uses_complexity = False

    def stop(self, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full((logits.shape[0],), k == self.exit, dtype=torch.bool)


@dataclass(frozen=True)
class ExitOutput:
    """Result of one adaptive forward pass."""

    logits: torch.Tensor  # [B, C] logits of the exit each sample left at
    exit_index: torch.Tensor  # [B] int64, 0-based exit each sample left at
    macs: torch.Tensor  # [B] int64 MACs spent on each sample
    stage_batch: tuple[int, ...]  # samples that entered each stage (compaction trace)
    rerouted: torch.Tensor | None = None  # [B] bool: an MoE expert failed and another answered (None: no MoE stage)


class DynamicNet(nn.Module):
    """Early-exit network built from a :class:`DynamicNetConfig`."""

    def __init__(self, cfg: DynamicNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stages, self.exits = make_backbone(cfg)
        self.complexity = ComplexityFeatures()
        self.moe_by_stage: dict[int, list[MoEBlock]] = {
            k: blocks for k, stage in enumerate(self.stages) if (blocks := [m for m in stage.modules() if isinstance(m, MoEBlock)])
        }
        self.mac_profile = self._profile_macs()
        self._reset_moe()
        self.register_buffer("_cum_macs", torch.tensor(self.mac_profile.cumulative, dtype=torch.int64), persistent=False)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def _profile_macs(self) -> MacProfile:
        was_training = self.training
        self.eval()
        h = torch.zeros(1, *self.cfg.input_shape)
        stage, exit_ = [], []
        for s, e in zip(self.stages, self.exits, strict=True):
            m, h = module_macs(s, h)
            stage.append(m)
            exit_.append(module_macs(e, h)[0])
        self.train(was_training)
        return MacProfile(stage=tuple(stage), exit=tuple(exit_))

    # -- mixture of experts ------------------------------------------------------------
    def moe_blocks(self) -> list[MoEBlock]:
        """Every MoE block, in stage order (empty for a dense network)."""
        return [b for k in sorted(self.moe_by_stage) for b in self.moe_by_stage[k]]

    def set_expert_runner(self, runner: ExpertRunner | None) -> None:
        """Run the MoE experts through ``runner`` (e.g. Ray actors); None = the local modules."""
        for b in self.moe_blocks():
            b.runner = runner

    def _reset_moe(self) -> None:
        for b in self.moe_blocks():
            b.last = None

    def moe_outputs(self) -> list[MoEOutput]:
        """The latest forward's output of every MoE block that ran."""
        return [b.last for b in self.moe_blocks() if b.last is not None]

    def moe_aux_loss(self) -> torch.Tensor:
        """Balance + z losses (with their coefficients) of the latest forward; 0 without MoE."""
        return sum((o.aux_loss for o in self.moe_outputs()), torch.zeros(()))

    def moe_extras(self, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """After stage k ran on n samples: (MAC correction [n], rerouted [n]) from its MoE blocks.

        The static profile counts A experts per token; a token whose assignment was dropped
        (or rerouted to a second expert after a failure) really cost one expert less (or more).
        """
        blocks = self.moe_by_stage.get(k)
        if not blocks:
            return None
        delta, rerouted = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
        for b in blocks:
            assert b.last is not None and b.last.active.shape[0] == n
            delta += (b.last.active - b.cfg.active_experts) * b.expert_macs
            rerouted |= b.last.rerouted
        return delta, rerouted

    def validate_input(self, x: object) -> torch.Tensor:
        """Refuse inputs the model cannot answer for, with a message that names the fix."""
        want = tuple(self.cfg.input_shape)
        if not isinstance(x, torch.Tensor):
            raise InputValidationError("input must be a torch.Tensor", got=type(x).__name__, fix=f"pass a float32 tensor [B, {', '.join(map(str, want))}]")
        if not x.is_floating_point():
            raise InputValidationError("input must be floating point in [0, 1]", got=str(x.dtype), fix="convert with x.float() / 255")
        if x.dim() != len(want) + 1 or tuple(x.shape[1:]) != want or x.shape[0] == 0:
            raise InputValidationError("wrong input shape", got=tuple(x.shape), fix=f"pass [B, {', '.join(map(str, want))}] with B >= 1")
        # one cheap reduction: the sum is non-finite iff some element is (float32 sums of
        # values in [0, 1] cannot overflow); only then pay for the element-wise check
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            raise InputValidationError("input contains NaN or Inf", got=int((~torch.isfinite(x)).sum()), fix="clean or drop the non-finite samples")
        return x.float()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Training/analysis path: logits of every exit for every sample, K x [B, C]."""
        self._reset_moe()
        out = []
        h = x
        for stage, head in zip(self.stages, self.exits, strict=True):
            h = stage(h)
            out.append(head(h))
        return out

    @torch.no_grad()
    def forward_exits(self, x: torch.Tensor, stop_rule: StopRule) -> ExitOutput:
        """Adaptive inference with batch compaction. x: [B, *input_shape] in [0, 1]."""
        x = self.validate_input(x)
        self._reset_moe()
        n = x.shape[0]
        logits_out = x.new_empty(n, self.cfg.num_classes)  # [B, C]
        exit_out = torch.full((n,), self.num_exits - 1, dtype=torch.int64)  # [B]
        b_idx = torch.arange(n)  # [b] original positions of the running samples
        # complexity features only when the rule reads them (a rule may declare it does not)
        uses_cx = getattr(stop_rule, "uses_complexity", True)
        b_cx = self.complexity(x) if uses_cx else x.new_zeros(n, 0)  # [b, F]
        h = x
        b_prev: torch.Tensor | None = None  # [b] previous exit's prediction
        seen: list[int] = []
        last = self.num_exits - 1
        macs_delta = torch.zeros(n, dtype=torch.int64)  # [B] MoE corrections to the static profile
        rerouted = torch.zeros(n, dtype=torch.bool) if self.moe_by_stage else None
        for k, (stage, head) in enumerate(zip(self.stages, self.exits, strict=True)):
            seen.append(h.shape[0])
            h = stage(h)
            if (extra := self.moe_extras(k, h.shape[0])) is not None:
                macs_delta.index_add_(0, b_idx, extra[0])
                rerouted[b_idx] |= extra[1]  # type: ignore[index]
            b_logits = head(h)  # [b, C]
            if k == last:
                logits_out[b_idx] = b_logits
                break
            stop = stop_rule.stop(k, b_logits, b_cx, b_prev)  # [b] bool
            b_prev = b_logits.argmax(dim=1)  # [b] for the next exit's agreement check
            stop_idx = stop.nonzero().squeeze(1)  # integer indices: index_select beats bool masks
            if stop_idx.numel():
                done = b_idx.index_select(0, stop_idx)
                logits_out.index_copy_(0, done, b_logits.index_select(0, stop_idx))
                exit_out.index_fill_(0, done, k)
                keep_idx = (~stop).nonzero().squeeze(1)
                if not keep_idx.numel():
                    break
                # compaction: only the samples still running enter stage k+1
                b_idx, h, b_cx = b_idx.index_select(0, keep_idx), h.index_select(0, keep_idx), b_cx.index_select(0, keep_idx)
                b_prev = b_prev.index_select(0, keep_idx)
        return ExitOutput(logits=logits_out, exit_index=exit_out, macs=self._cum_macs[exit_out] + macs_delta, stage_batch=tuple(seen), rerouted=rerouted)

    @torch.no_grad()
    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network: every stage, only the last exit head. x: [B, ...] -> [B, C]."""
        h = self.validate_input(x)
        for stage in self.stages:
            h = stage(h)
        return self.exits[-1](h)
