"""Run a contiguous range of DynamicNet stages: the unit of work one device executes.

An edge device hosts stages ``[0, k)`` with their exits; a cloud device hosts ``[k, K)``
or the whole model. :func:`run_stages` runs a batch through its range with the batch
compaction loop of :meth:`DynamicNet.forward_range`, the one
:meth:`DynamicNet.forward_exits` runs over the whole model. Samples the stop rule keeps running past
the last hosted stage come back as **continuations**: the intermediate activations, the
complexity features and the last prediction, so the next device resumes exactly where
this one stopped and no work is redone. Each continuation also carries the logits of the
deepest exit already evaluated, which is the degraded answer when no deeper device can
be reached.

Shape legend: B batch entering the range, b running, d done here, r continuing,
C classes, F complexity features, K exits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynray.errors import ConfigError
from dynray.routing.rules import RouteContext, RouteTrace
from dynray.models.dynamic import DynamicNet, StopRule

__all__ = ["StageRange", "StageInput", "StageResult", "DeviceRequest", "DeviceReply", "run_stages", "range_macs", "concat_inputs", "split_result", "group_requests", "split_reply"]


@dataclass(frozen=True, kw_only=True)
class StageRange:
    """A contiguous stage range ``[start, stop)`` of a DynamicNet."""

    start: int
    """First hosted stage (0 = the device takes raw images)."""
    stop: int
    """One past the last hosted stage."""
    full: bool = False
    """Static mode: run every hosted stage and only the final exit head (no early exits).
    Only valid for the whole model; this is the plain network the baselines serve."""

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ConfigError("stage range must satisfy 0 <= start < stop", got=(self.start, self.stop), fix="e.g. start=0, stop=2 for an edge device hosting the first two stages")
        if self.full and self.start != 0:
            raise ConfigError("full (static) mode needs the whole model", got=(self.start, self.stop), fix="use start=0 and stop=num_exits with full=True")

    def check(self, model: DynamicNet) -> StageRange:
        """Validate against a concrete model (stop <= K; full mode covers every stage)."""
        k = model.num_exits
        if self.stop > k or (self.full and self.stop != k):
            raise ConfigError("stage range does not fit the model", got=(self.start, self.stop, f"model has {k} stages"), fix=f"pick 0 <= start < stop <= {k}")
        return self


@dataclass(frozen=True)
class StageInput:
    """What enters a device: raw images (start 0) or another device's continuations."""

    h: torch.Tensor  # [B, ...] images [B, C, H, W] in [0, 1] at stage 0, else activations
    complexity: torch.Tensor | None = None  # [B, F] normalised features (None: compute or skip)
    prev_pred: torch.Tensor | None = None  # [B] int64 argmax of the previous exit


@dataclass(frozen=True)
class StageResult:
    """What one device returns for one batch (positions index the batch that entered)."""

    done: torch.Tensor  # [d] int64 positions answered here
    logits: torch.Tensor  # [d, C] logits of the exit each answered sample left at
    exit_index: torch.Tensor  # [d] int64 global exit index
    macs: torch.Tensor  # [B] int64 MACs this device spent on each sample
    cont: torch.Tensor  # [r] int64 positions that must continue on the next device
    cont_input: StageInput | None  # activations etc. of the continuing samples (None if r == 0)
    cont_logits: torch.Tensor  # [r, C] deepest evaluated exit's logits: the degraded answer
    cont_exit: int  # global index of that exit (-1 if the range evaluated none)
    stage_batch: tuple[int, ...]  # samples that entered each hosted stage, for the whole (batched) forward this ran in
    rerouted: torch.Tensor | None = None  # [B] bool: a failed MoE expert's work went to another expert (None: no MoE stage ran)
    route_trace: RouteTrace | None = None  # [B] the hybrid router's overrides of the rules (None: another router, or no decision here)

    @property
    def batch_size(self) -> int:
        return int(self.macs.shape[0])


@dataclass(frozen=True)
class DeviceRequest:
    """One call to a device: run ``inp`` from stage ``start`` with model ``version``."""

    version: str  # concrete registry ref, name:vN
    start: int  # first stage to run (0 = raw images)
    inp: StageInput
    route: RouteContext | None = None  # router, live load and cost weights (None: the model's thresholds)


@dataclass(frozen=True)
class DeviceReply:
    """A device's answer to one :class:`DeviceRequest`, with its live load."""

    result: StageResult
    tier: str
    replica: str
    load: dict  # scheduling.LoadReport.to_dict() at reply time
    ms_per_mmac: float  # real compute time per million MACs of the batch this ran in (before injected slowdown)


def range_macs(model: DynamicNet, rng: StageRange) -> int:
    """MACs per sample of one pass over the range (every stage and every hosted head)."""
    p = model.mac_profile
    if rng.full:
        return sum(p.stage) + p.exit[-1]
    return sum(p.stage[rng.start : rng.stop]) + sum(p.exit[rng.start : rng.stop])


def _cat(parts: Sequence[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts) if parts else empty


@torch.no_grad()
def run_stages(model: DynamicNet, rng: StageRange, inp: StageInput, stop_rule: StopRule) -> StageResult:
    """Run ``inp`` through the hosted stages with batch compaction (see module docstring).

    The compaction loop is :meth:`DynamicNet.forward_range`, the one ``forward_exits`` runs;
    this wraps its output as a device's :class:`StageResult`.
    """
    rng.check(model)
    h = model.validate_input(inp.h) if rng.start == 0 else inp.h
    n, last_global = h.shape[0], model.num_exits - 1
    if rng.full:  # the static network: no exits to decide, so no compaction
        macs = torch.zeros(n, dtype=torch.int64)  # [B]
        rerouted_full = torch.zeros(n, dtype=torch.bool) if model.moe_by_stage else None
        for k, stage in enumerate(model.stages):
            h = stage(h)
            if (extra := model.moe_extras(k, n)) is not None:
                macs += extra[0]
                rerouted_full |= extra[1]  # type: ignore[operator]
        macs += range_macs(model, rng)
        empty = torch.empty(0, dtype=torch.int64)
        return StageResult(done=torch.arange(n), logits=model.exits[-1](h), exit_index=torch.full((n,), last_global, dtype=torch.int64), macs=macs, cont=empty, cont_input=None, cont_logits=h.new_empty(0, model.cfg.num_classes), cont_exit=-1, stage_batch=(n,) * model.num_exits, rerouted=rerouted_full)

    uses_cx = getattr(stop_rule, "uses_complexity", True)
    if inp.complexity is not None:
        cx = inp.complexity
    else:
        # features are computed from the raw images, so only the first device can make them
        if uses_cx and rng.start != 0:
            raise ConfigError("this stop rule reads complexity features, which the first device must forward", got=rng, fix="forward StageResult.cont_input unchanged")
        cx = model.complexity(h) if uses_cx else h.new_zeros(n, 0)  # [B, F]
    r = model.forward_range(h, rng.start, rng.stop, stop_rule, cx, inp.prev_pred)
    i64 = torch.empty(0, dtype=torch.int64)
    done = _cat(r.done, i64)  # [d] grouped by exit, in stage order
    c = r.cont
    return StageResult(
        done=done,
        logits=_cat(r.done_logits, h.new_empty(0, model.cfg.num_classes)),
        exit_index=r.exit_index.index_select(0, done),
        macs=r.macs,
        cont=i64 if c is None else c.positions,
        cont_input=None if c is None else StageInput(h=c.h, complexity=c.complexity, prev_pred=c.prev_pred),
        cont_logits=h.new_empty(0, model.cfg.num_classes) if c is None else c.logits,
        cont_exit=-1 if c is None else rng.stop - 1,
        stage_batch=r.stage_batch,
        rerouted=r.rerouted,
        route_trace=getattr(stop_rule, "trace", None),
    )


def concat_inputs(inputs: list[StageInput]) -> StageInput:
    """Stack the inputs of several requests into one batch (for dynamic batching)."""
    if len(inputs) == 1:
        return inputs[0]
    cx = None if any(i.complexity is None for i in inputs) else torch.cat([i.complexity for i in inputs])
    prev = None if any(i.prev_pred is None for i in inputs) else torch.cat([i.prev_pred for i in inputs])
    return StageInput(h=torch.cat([i.h for i in inputs]), complexity=cx, prev_pred=prev)


def split_result(res: StageResult, sizes: list[int]) -> list[StageResult]:
    """Undo :func:`concat_inputs`: one result per request, positions local to each request."""
    if len(sizes) == 1:
        return [res]
    out, lo = [], 0
    cont_in = res.cont_input
    for n in sizes:
        hi = lo + n
        d = ((res.done >= lo) & (res.done < hi)).nonzero().squeeze(1)  # rows of done/logits/exit
        c = ((res.cont >= lo) & (res.cont < hi)).nonzero().squeeze(1)  # rows of the continuations
        part_in = None
        if cont_in is not None and c.numel():
            part_in = StageInput(
                h=cont_in.h.index_select(0, c),
                complexity=None if cont_in.complexity is None else cont_in.complexity.index_select(0, c),
                prev_pred=None if cont_in.prev_pred is None else cont_in.prev_pred.index_select(0, c),
            )
        out.append(
            StageResult(
                done=res.done.index_select(0, d) - lo,
                logits=res.logits.index_select(0, d),
                exit_index=res.exit_index.index_select(0, d),
                macs=res.macs[lo:hi],
                cont=res.cont.index_select(0, c) - lo,
                cont_input=part_in,
                cont_logits=res.cont_logits.index_select(0, c),
                cont_exit=res.cont_exit if c.numel() else -1,
                stage_batch=res.stage_batch,
                rerouted=None if res.rerouted is None else res.rerouted[lo:hi],
                route_trace=None if res.route_trace is None else res.route_trace.index_select(torch.arange(lo, hi)),
            )
        )
        lo = hi
    return out


def group_requests(reqs: list[DeviceRequest]) -> list[tuple[DeviceRequest, list[int], list[int]]]:
    """Merge requests that share (version, start, router) into one: (merged, positions, sizes).

    Dynamic batching on both sides of a hop uses this: the device runs one forward per
    group, and the ingress sends one call per group instead of one per HTTP request.
    """
    groups: dict[tuple[str, int, str], list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault((r.version, r.start, r.route.router if r.route else "thresholds"), []).append(i)
    out = []
    for (version, start, _), idx in groups.items():
        inputs = [reqs[i].inp for i in idx]
        # requests coalesced within one batch window share the first one's load snapshot
        out.append((DeviceRequest(version, start, concat_inputs(inputs), reqs[idx[0]].route), idx, [x.h.shape[0] for x in inputs]))
    return out


def split_reply(reply: DeviceReply, sizes: list[int]) -> list[DeviceReply]:
    """One reply per merged request (see :func:`group_requests`)."""
    return [DeviceReply(result=r, tier=reply.tier, replica=reply.replica, load=reply.load, ms_per_mmac=reply.ms_per_mmac) for r in split_result(reply.result, sizes)]
