"""Sparse mixture-of-experts blocks: top-k gating with capacity, balance losses, dispatch.

A token here is one **sample**: the gate reads a summary of the sample's features and sends
the whole sample to its chosen experts, the second form of per-sample routing next to early
exit. An MoE block is residual, ``y = relu(h + Σ_e g_e · E_e(h))``, so a token whose
assignments are all dropped by the capacity limit passes through unchanged (``h`` is already
post-ReLU).

- **Gates** (:mod:`dynray.models.gating`): noisy top-k (Shazeer et al. 2017), top-1 Switch
  (Fedus et al. 2021) and top-2 GShard (Lepikhin et al. 2020), flat or hierarchical.
- **Capacity**: each expert takes at most ``max(min_capacity, ceil(cf · N · A / E))``
  assignments per batch (A experts per token); the rest are dropped, first choices before
  second ones and, within a choice rank, higher gate weights first (batch-prioritised routing,
  Riquelme et al. 2021).
- **Losses**: the Switch load-balancing loss ``α · E · Σ_i f_i · P_i`` and the router z-loss
  ``β · mean(logsumexp(logits)²)`` (Zoph et al. 2022).
- **Sparse dispatch**: only experts that received tokens are called, once each, on the
  gathered tokens; their outputs are scattered back weighted by the gate.
- **Remote experts**: an :class:`ExpertRunner` can run the experts elsewhere (Ray actors,
  Serve deployments: ``actors/expert.py``). When an expert fails, its tokens go to the
  next-best live expert by gate score and are flagged ``rerouted``; a token with no live
  expert left keeps the residual path. No token is lost.

Shape legend: N tokens (samples) entering the block, A active experts per token,
E experts, D the feature shape of one token ([W, H, W'] for cnn, [W] for mlp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dynray.models.gating import GateOutput, MoEConfig, make_gate
from dynray.models.macs import module_macs

__all__ = ["MoEConfig", "MoEBlock", "MoEOutput", "MoEUsage", "ExpertRunner", "ExpertReplies", "LocalExperts", "balance_loss", "z_loss", "capacity", "make_expert"]


@dataclass(frozen=True)
class ExpertReplies:
    """What a runner returns for one dispatch: outputs of the experts that answered."""

    outputs: dict[int, torch.Tensor]  # expert -> [n_e, *D]
    failed: frozenset[int] = frozenset()  # experts that did not answer


class ExpertRunner(Protocol):
    """Runs experts on their gathered tokens: ``batches`` maps expert -> [n_e, *D].

    ``block`` is the MoE block's stage index, so one runner serves every MoE block of a model.
    Each expert must be called at most once per ``run`` (all its tokens in one batch).
    """

    def run(self, block: int, batches: dict[int, torch.Tensor]) -> ExpertReplies: ...


@dataclass(frozen=True)
class LocalExperts:
    """The default runner: the block's own expert modules, in this process."""

    experts: nn.ModuleList

    def run(self, block: int, batches: dict[int, torch.Tensor]) -> ExpertReplies:
        return ExpertReplies(outputs={e: self.experts[e](x) for e, x in batches.items()})


@dataclass(frozen=True)
class MoEOutput:
    """One MoE block's forward: the output and everything training and the bench report."""

    y: torch.Tensor  # [N, *D]
    aux_loss: torch.Tensor  # scalar: balance_coef · balance + z_coef · z (what training adds)
    balance_loss: torch.Tensor  # scalar, unscaled: E · Σ f_i P_i (1 at uniform routing)
    z_loss: torch.Tensor  # scalar, unscaled
    expert_tokens: torch.Tensor  # [E] int64 assignments each expert computed (after capacity)
    assignments: int  # N · A assignments the gate made (before capacity)
    dropped: int  # assignments dropped by the capacity limit
    active: torch.Tensor  # [N] int64 experts that really computed each token
    rerouted: torch.Tensor  # [N] bool: an expert of this token failed and another answered (or none could)


class MoEUsage:
    """Accumulates expert utilisation and drops over many forwards (training epochs, bench splits)."""

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []  # per block: [E] assignments computed
        self.assignments = 0
        self.dropped = 0
        self.rerouted = 0

    def add(self, outputs: list[MoEOutput]) -> None:
        if not self.tokens:
            self.tokens = [torch.zeros_like(o.expert_tokens) for o in outputs]
        for acc, o in zip(self.tokens, outputs, strict=True):
            acc += o.expert_tokens
            self.assignments += o.assignments
            self.dropped += o.dropped
            self.rerouted += int(o.rerouted.sum())

    def summary(self) -> dict:
        """``expert_share``: per block, each expert's share of the computed assignments;
        ``expert_share_min_vs_uniform``: the smallest share over a uniform 1/E (1 = balanced);
        ``dropped_frac``: assignments dropped by the capacity limit over all assignments."""
        if not self.tokens:
            return {}
        shares = [(t.double() / t.sum().clamp_min(1)).tolist() for t in self.tokens]
        return {
            "expert_share": [[round(x, 4) for x in s] for s in shares],
            "expert_share_min": min(min(s) for s in shares),
            "expert_share_min_vs_uniform": min(min(s) * len(s) for s in shares),
            "dropped_frac": self.dropped / max(self.assignments, 1),
            "assignments": self.assignments,
            "rerouted": self.rerouted,
        }


def capacity(tokens: int, cfg: MoEConfig, *, training: bool) -> int:
    """Assignments one expert may take from a batch of ``tokens``."""
    cf = cfg.capacity_factor_train if training else cfg.capacity_factor_eval
    return max(cfg.min_capacity, math.ceil(cf * tokens * cfg.active_experts / cfg.num_experts))


def balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch load-balancing loss without its coefficient: ``E · Σ_i f_i · P_i``.

    probs: [N, E] router probabilities; expert_idx: [N, A] chosen experts (before capacity).
    f_i is the share of assignments routed to expert i (not differentiable), P_i the mean
    router probability of expert i. It is 1 when routing is uniform.
    """
    counts = torch.bincount(expert_idx.reshape(-1), minlength=num_experts).to(probs.dtype)  # [E]
    f = counts / counts.sum().clamp_min(1)
    p = probs.mean(dim=0)  # [E]
    return num_experts * (f * p).sum()


def z_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """Router z-loss: mean squared log-partition of every gate's logits (keeps them small)."""
    return sum(torch.logsumexp(z, dim=-1).square().mean() for z in logits)  # type: ignore[return-value]


def make_expert(kind: str, width: int, hidden: int, kernel_size: int = 3) -> nn.Sequential:
    """One expert: a two-layer residual branch at the stage's width (MACs linear in ``hidden``)."""
    if kind == "cnn":
        p = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(width, hidden, kernel_size, padding=p, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, width, kernel_size, padding=p, bias=False),
            nn.BatchNorm2d(width),
        )
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))


def _keep_by_capacity(expert_idx: torch.Tensor, weights: torch.Tensor, cap: int, num_experts: int) -> torch.Tensor:
    """[N, A] bool: assignments that fit their expert's capacity.

    Queue order per expert: choice rank 0 before rank 1, and higher gate weight first within
    a rank (weights are in [0, 1], so ``rank · 2 − weight`` sorts both at once).
    """
    n, a = expert_idx.shape
    rank = torch.arange(a, device=expert_idx.device).expand(n, a)
    key = (rank * 2.0 - weights.detach()).t().reshape(-1)  # [A·N] rank-major
    flat_e = expert_idx.t().reshape(-1)
    order = torch.argsort(key, stable=True)
    e_sorted = flat_e[order]
    onehot = F.one_hot(e_sorted, num_experts)  # [A·N, E]
    pos = (onehot.cumsum(dim=0) - 1).gather(1, e_sorted.unsqueeze(1)).squeeze(1)  # queue position
    keep_flat = torch.empty_like(pos, dtype=torch.bool)
    keep_flat[order] = pos < cap
    return keep_flat.view(a, n).t()


class MoEBlock(nn.Module):
    """Residual MoE block for one stage: gate + experts + capacity + dispatch."""

    def __init__(self, cfg: MoEConfig, *, kind: str, width: int, block: int, spatial: tuple[int, int] | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        self.cfg, self.kind, self.block = cfg, kind, block
        self.gate = make_gate(cfg, width)
        hidden = cfg.hidden(width)
        self.experts = nn.ModuleList(make_expert(kind, width, hidden, kernel_size) for _ in range(cfg.num_experts))
        self.shared = nn.ModuleList(make_expert(kind, width, hidden, kernel_size) for _ in range(cfg.shared_experts))
        self.token_shape = (width, *spatial) if spatial else (width,)
        probe = self.experts[0]
        was = probe.training
        self.expert_macs = module_macs(probe.eval(), torch.zeros(1, *self.token_shape))[0]  # one expert on one token
        probe.train(was)
        self.runner: ExpertRunner | None = None  # None: LocalExperts(self.experts); see DynamicNet.set_expert_runner
        self.last: MoEOutput | None = None  # the latest forward's stats and losses (read by training and the bench)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.forward_moe(h)
        self.last = out
        return out.y

    def forward_moe(self, h: torch.Tensor) -> MoEOutput:
        """h: [N, *D] -> MoEOutput (see the module docstring)."""
        cfg, n = self.cfg, h.shape[0]
        summary = h.mean(dim=(2, 3)) if h.dim() == 4 else h  # [N, W] the gate's view of a token
        g: GateOutput = self.gate(summary)
        keep = g.mask & _keep_by_capacity(g.expert_idx, g.weights, capacity(n, cfg, training=self.training), cfg.num_experts)  # [N, A]
        dropped = int((g.mask & ~keep).sum())
        bal = balance_loss(g.probs, g.expert_idx, cfg.num_experts) if cfg.num_experts > 1 else h.new_zeros(())
        zl = z_loss(g.logits) if g.logits else h.new_zeros(())
        y, active, rerouted = self._dispatch(h, g, keep)
        for expert in self.shared:  # always on, weight 1
            y = y + expert(h)
        return MoEOutput(
            y=torch.relu(y),
            aux_loss=cfg.balance_coef * bal + cfg.z_coef * zl,
            balance_loss=bal.detach(),
            z_loss=zl.detach(),
            expert_tokens=torch.bincount(g.expert_idx[keep], minlength=cfg.num_experts),
            assignments=int(g.mask.sum()),
            dropped=dropped,
            active=active,
            rerouted=rerouted,
        )

    def _dispatch(self, h: torch.Tensor, g: GateOutput, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gather each expert's tokens, run them (one call per expert), scatter back."""
        runner = self.runner or LocalExperts(self.experts)
        n, num_e = h.shape[0], self.cfg.num_experts
        tok = torch.arange(n, device=h.device).unsqueeze(1).expand_as(g.expert_idx)  # [N, A]
        # pending: expert -> (token positions, gate weights); one record per in-flight assignment
        pending = {e: (tok[m], g.weights[m]) for e in range(num_e) if (m := keep & (g.expert_idx == e)).any()}
        used = torch.zeros(n, num_e, dtype=torch.bool, device=h.device)  # experts each token is already using
        used[tok[keep], g.expert_idx[keep]] = True
        dead: set[int] = set()
        out = h
        active = torch.zeros(n, dtype=torch.int64)
        rerouted = torch.zeros(n, dtype=torch.bool)
        while pending:
            replies = runner.run(self.block, {e: h.index_select(0, t) for e, (t, _) in pending.items()})
            for e, (t, w) in pending.items():
                if e in replies.outputs:
                    ye = replies.outputs[e]  # [n_e, *D]
                    out = out.index_add(0, t, ye * w.view(-1, *([1] * (ye.dim() - 1))).to(ye.dtype))
                    active.index_add_(0, t.cpu(), torch.ones_like(t.cpu()))
            failed = {e for e in pending if e not in replies.outputs} | set(replies.failed)
            retry: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for e in sorted(failed & set(pending)):
                dead.add(e)
                t, w = pending[e]
                rerouted[t.cpu()] = True
                # next-best live expert by gate score that this token is not already using
                score = g.probs.detach().index_select(0, t).clone()  # [n_e, E]
                score[used.index_select(0, t)] = -1.0
                if dead:
                    score[:, sorted(dead)] = -1.0
                best_s, best_e = score.max(dim=1)
                ok = best_s >= 0  # tokens with no live expert left keep the residual path
                for alt in best_e[ok].unique().tolist():
                    m = ok & (best_e == alt)
                    used[t[m], alt] = True
                    ts, ws = retry.setdefault(alt, ([], []))
                    ts.append(t[m])
                    ws.append(w[m])
            pending = {e: (torch.cat(ts), torch.cat(ws)) for e, (ts, ws) in retry.items() if e not in dead}
        return out, active, rerouted
