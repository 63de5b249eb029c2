"""DynamicNet: a staged backbone with an exit head after every stage.

Inference walks the stages with **batch compaction**: after each exit the stop rule picks
the samples that are done, their logits are written out, and only the remaining samples
enter the next stage, so the compute really shrinks with the number of easy inputs. One
loop does this, :meth:`DynamicNet.forward_range`, for any stage range: the whole model
(:meth:`DynamicNet.forward_exits`) or the part one device hosts (``serving.partition``).

Shape legend: B batch (entering a stage range), b running (compacted) batch, d answered
at one exit, r still running past a range, C classes, F complexity features, K exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import torch
from torch import nn

from dynray.complexity import ComplexityFeatures
from dynray.errors import InputValidationError
from dynray.models.backbones import make_backbone
from dynray.models.config import DynamicNetConfig
from dynray.models.macs import MacProfile, module_macs
from dynray.models.moe import ExpertRunner, MoEBlock, MoEOutput

__all__ = ["Continuation", "DynamicNet", "ExitOutput", "RangeOutput", "StopRule", "StopAtExit"]


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


@dataclass(frozen=True)
class Continuation:
    """The samples still running past a stage range: what the next stage needs to resume."""

    positions: torch.Tensor  # [r] int64 positions in the batch that entered the range
    h: torch.Tensor  # [r, ...] activations after the range's last stage
    complexity: torch.Tensor  # [r, F] the rule's complexity features ([r, 0] if it reads none)
    prev_pred: torch.Tensor  # [r] int64 argmax of the range's last exit
    logits: torch.Tensor  # [r, C] logits of the range's last exit (the deepest evaluated)


@dataclass(frozen=True)
class RangeOutput:
    """Result of :meth:`DynamicNet.forward_range` over stages ``[start, stop)``.

    Positions index the batch that entered the range. The answered samples come in one
    group per exit that answered some, in stage order.
    """

    done: tuple[torch.Tensor, ...]  # per answering exit: [d_k] int64 positions
    done_logits: tuple[torch.Tensor, ...]  # per answering exit: [d_k, C] its logits
    done_exit: tuple[int, ...]  # per answering exit: its global index k
    exit_index: torch.Tensor  # [B] int64 exit each sample left at (stop-1 for the continuing ones)
    macs: torch.Tensor  # [B] int64 MACs spent on each sample in the range
    stage_batch: tuple[int, ...]  # samples that entered each stage of the range (compaction trace)
    rerouted: torch.Tensor | None  # [B] bool: an MoE expert failed and another answered (None: no MoE stage in the range)
    cont: Continuation | None  # the samples still running past stop (None: every sample was answered)


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
        """Adaptive inference with batch compaction. x: [B, *input_shape] in [0, 1].

        The whole model is the stage range [0, K): run it, then scatter the answers of each
        exit back to the samples' positions.
        """
        x = self.validate_input(x)
        self._reset_moe()
        n = x.shape[0]
        # complexity features only when the rule reads them (a rule may declare it does not)
        uses_cx = getattr(stop_rule, "uses_complexity", True)
        cx = self.complexity(x) if uses_cx else x.new_zeros(n, 0)  # [B, F]
        r = self.forward_range(x, 0, self.num_exits, stop_rule, cx)
        if len(r.done) == 1:  # one exit answered the whole batch, in batch order
            logits = r.done_logits[0]  # [B, C]
        else:
            logits = x.new_empty(n, self.cfg.num_classes)  # [B, C]
            for d_idx, d_logits in zip(r.done, r.done_logits, strict=True):
                logits.index_copy_(0, d_idx, d_logits)
        return ExitOutput(logits=logits, exit_index=r.exit_index, macs=r.macs, stage_batch=r.stage_batch, rerouted=r.rerouted)

    @torch.no_grad()
    def forward_range(self, h: torch.Tensor, start: int, stop: int, stop_rule: StopRule, complexity: torch.Tensor, prev_pred: torch.Tensor | None = None) -> RangeOutput:
        """Run stages ``start..stop-1`` with their exits and batch compaction.

        This is the one compaction loop: :meth:`forward_exits` runs the range [0, K), a
        device (``dynray.serving.partition.run_stages``) runs the range it hosts.
        h: [B, ...] input of stage ``start`` (validated images at stage 0, else activations);
        complexity: [B, F] features for the rule ([B, 0] if it reads none); prev_pred: [B]
        int64 argmax of exit ``start - 1`` (None at exit 0). After each exit the rule picks
        the samples that leave, and only the others enter the next stage; the last exit of
        the model always stops, without asking the rule. Positions in the output index the
        batch that entered the range.
        """
        n, last = h.shape[0], self.num_exits - 1
        assert 0 <= start < stop <= self.num_exits, (start, stop)
        b_idx = torch.arange(n)  # [b] positions of the running samples
        b_cx, b_prev = complexity, prev_pred  # [b, F], [b]
        # the deepest exit each sample reached: the one it left at, stop-1 if it runs on
        exit_index = torch.full((n,), stop - 1, dtype=torch.int64)  # [B]
        moe = any(start <= k < stop for k in self.moe_by_stage)
        macs_delta = torch.zeros(n, dtype=torch.int64) if moe else None  # [B] MoE corrections to the static profile
        rerouted = torch.zeros(n, dtype=torch.bool) if moe else None  # [B]
        done: list[torch.Tensor] = []  # per answering exit: [d_k] positions
        done_logits: list[torch.Tensor] = []  # per answering exit: [d_k, C]
        done_exit: list[int] = []
        seen: list[int] = []
        running = True
        for k, (stage, head) in enumerate(islice(zip(self.stages, self.exits, strict=True), start, stop), start):
            b = h.shape[0]
            seen.append(b)
            h = stage(h)
            if moe and (extra := self.moe_extras(k, b)) is not None:  # MoE: only the experts that ran
                macs_delta.index_add_(0, b_idx, extra[0])  # type: ignore[union-attr]
                rerouted[b_idx] |= extra[1]  # type: ignore[index]
            b_logits = head(h)  # [b, C]
            if k == last:  # the last exit always stops
                done.append(b_idx)
                done_logits.append(b_logits)
                done_exit.append(k)
                running = False
                break
            b_stop = stop_rule.stop(k, b_logits, b_cx, b_prev)  # [b] bool
            b_prev = b_logits.argmax(dim=1)  # [b] for the next exit's agreement check
            stop_idx = b_stop.nonzero().squeeze(1)  # integer indices: index_select beats bool masks
            n_stop = stop_idx.numel()
            if n_stop == b:  # everyone still running leaves here (also an empty batch)
                done.append(b_idx)
                done_logits.append(b_logits)
                done_exit.append(k)
                if k != stop - 1:
                    exit_index.index_fill_(0, b_idx, k)
                running = False
                break
            if n_stop:
                d_idx = b_idx.index_select(0, stop_idx)  # [d]
                done.append(d_idx)
                done_logits.append(b_logits.index_select(0, stop_idx))
                done_exit.append(k)
                if k != stop - 1:
                    exit_index.index_fill_(0, d_idx, k)
                keep_idx = (~b_stop).nonzero().squeeze(1)  # [b'] (non-empty: not everyone stopped)
                # compaction: only the samples still running enter stage k+1
                b_idx, h, b_cx, b_prev = b_idx.index_select(0, keep_idx), h.index_select(0, keep_idx), b_cx.index_select(0, keep_idx), b_prev.index_select(0, keep_idx)
                if k == stop - 1:
                    b_logits = b_logits.index_select(0, keep_idx)
        # static profile: stages and heads start..exit of each sample
        macs = self._cum_macs[exit_index]  # [B]
        if start:
            macs = macs - self._cum_macs[start - 1]
        if macs_delta is not None:
            macs = macs + macs_delta
        cont = Continuation(positions=b_idx, h=h, complexity=b_cx, prev_pred=b_prev, logits=b_logits) if running else None  # type: ignore[arg-type]
        return RangeOutput(done=tuple(done), done_logits=tuple(done_logits), done_exit=tuple(done_exit), exit_index=exit_index, macs=macs, stage_batch=tuple(seen), rerouted=rerouted, cont=cont)

    @torch.no_grad()
    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network: every stage, only the last exit head. x: [B, ...] -> [B, C]."""
        h = self.validate_input(x)
        for stage in self.stages:
            h = stage(h)
        return self.exits[-1](h)
