"""MoE configuration and gates: noisy top-k, Switch top-1, GShard top-2, flat or hierarchical.

- ``noisy_topk`` (Shazeer et al. 2017, eq. 3-5): ``H = x·W_g + ε · softplus(x·W_noise)``
  during training; the k largest are kept and softmaxed, so the chosen weights sum to 1.
- ``switch`` (Fedus et al. 2021): top-1 of ``softmax(x·W_g)``; the weight is the router
  probability itself (not renormalised), which is how the gate gets a gradient with k = 1.
- ``gshard`` (Lepikhin et al. 2020): top-2, weights renormalised to sum to 1; during
  training the second expert is used only with probability ``2 · g_2`` (random routing).
- **Hierarchical** (``groups > 1``, Shazeer et al. §B): a group gate picks ``group_top_k``
  groups, then an expert gate inside each chosen group picks ``top_k`` experts; a token's
  weight for an expert is group weight × expert weight, and ``probs`` is the product
  distribution over all experts.

Shape legend: N tokens, W gate input features, G groups, E experts, A = group_top_k · top_k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from dynray.errors import ConfigError

__all__ = ["GATES", "MoEConfig", "GateOutput", "Gate", "make_gate"]

GATES = ("noisy_topk", "switch", "gshard")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Turns stages of a DynamicNet into residual mixture-of-experts stages."""

    stages: tuple[int, ...] = (2,)
    """0-based stages that end with an MoE block (after the stage's own layers, before its pooling)."""
    num_experts: int = 4
    """Experts per MoE block. 1 makes a dense residual block with no gate (the equal-MACs baseline)."""
    top_k: int = 2
    """Experts each token uses (within each chosen group when groups > 1)."""
    gate: str = "noisy_topk"
    """Gating: noisy_topk (Shazeer 2017), switch (top-1, Fedus 2021) or gshard (top-2, Lepikhin 2020)."""
    groups: int = 1
    """Expert groups; > 1 makes the gate hierarchical (group gate, then expert gate in the group)."""
    group_top_k: int = 1
    """Groups each token uses (hierarchical mode only)."""
    shared_experts: int = 0
    """Always-on experts every token goes through with weight 1, beside the routed ones
    (DeepSeekMoE's shared experts, Dai et al. 2024); they run where the stage runs."""
    expert_ratio: float = 0.25
    """Hidden channels (cnn) or units (mlp) of each expert's two-layer branch, as a fraction of
    the stage width (an expert's MACs are linear in it)."""
    capacity_factor_train: float = 1.25
    """Expert capacity during training, as a multiple of a uniform share of the assignments."""
    capacity_factor_eval: float = 2.0
    """Expert capacity at evaluation and serving."""
    min_capacity: int = 4
    """Least capacity per expert, so small (and batch-1) serving batches are never dropped."""
    balance_coef: float = 0.1
    """α of the Switch load-balancing loss added to the training loss. The Switch paper uses
    0.01 over thousands of tokens per batch; routing whole samples in batches of 64 needs a
    firmer push (on mnist-5k, 0.01 let one seed collapse onto 2 of 4 experts; 0.05 and 0.1
    kept every expert at >= 0.75x its uniform share on test)."""
    z_coef: float = 0.001
    """β of the router z-loss added to the training loss."""

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ConfigError("unknown MoE gate", got=self.gate, fix=f"use one of {', '.join(GATES)}")
        if self.num_experts < 1 or self.top_k < 1 or self.groups < 1 or self.group_top_k < 1:
            raise ConfigError("num_experts, top_k, groups and group_top_k must be >= 1", got=(self.num_experts, self.top_k, self.groups, self.group_top_k), fix="e.g. num_experts=4, top_k=2")
        if self.num_experts % self.groups:
            raise ConfigError("groups must divide num_experts", got={"num_experts": self.num_experts, "groups": self.groups}, fix=f"pick groups among {[g for g in range(1, self.num_experts + 1) if self.num_experts % g == 0]}")
        per_group = self.num_experts // self.groups
        if self.top_k > per_group:
            where = "experts" if self.groups == 1 else f"experts per group ({per_group})"
            raise ConfigError(f"top_k is larger than the {where}", got={"top_k": self.top_k, "num_experts": self.num_experts, "groups": self.groups}, fix=f"use top_k <= {per_group}")
        if self.group_top_k > self.groups:
            raise ConfigError("group_top_k is larger than groups", got=(self.group_top_k, self.groups), fix=f"use group_top_k <= {self.groups}")
        if self.gate == "switch" and (self.top_k != 1 or self.group_top_k != 1):
            raise ConfigError("the switch gate is top-1", got=(self.top_k, self.group_top_k), fix="set top_k=1 (and group_top_k=1), or use gate='noisy_topk'")
        if self.gate == "gshard" and self.top_k != 2:
            raise ConfigError("the gshard gate is top-2", got=self.top_k, fix="set top_k=2, or use gate='noisy_topk'")
        if self.capacity_factor_train <= 0 or self.capacity_factor_eval <= 0:
            raise ConfigError("capacity factors must be > 0", got=(self.capacity_factor_train, self.capacity_factor_eval), fix="use e.g. 1.25 for training and 2.0 for evaluation")
        if self.shared_experts < 0:
            raise ConfigError("shared_experts must be >= 0", got=self.shared_experts, fix="use 0 or 1")
        if self.min_capacity < 1:
            raise ConfigError("min_capacity must be >= 1", got=self.min_capacity, fix="use e.g. 4")
        if self.expert_ratio <= 0 or self.balance_coef < 0 or self.z_coef < 0:
            raise ConfigError("expert_ratio must be > 0 and the loss coefficients >= 0", got=(self.expert_ratio, self.balance_coef, self.z_coef), fix="e.g. expert_ratio=0.25, balance_coef=0.01, z_coef=0.001")
        if len(set(self.stages)) != len(self.stages) or not self.stages or min(self.stages) < 0:
            raise ConfigError("stages must list distinct 0-based stage indices", got=self.stages, fix="e.g. stages=(2,)")

    @property
    def active_experts(self) -> int:
        """Experts each token uses: group_top_k · top_k (A)."""
        return self.group_top_k * self.top_k if self.groups > 1 else self.top_k

    def hidden(self, width: int) -> int:
        """An expert's hidden size in a stage of ``width``."""
        return max(1, round(self.expert_ratio * width))

    def dense_equivalent(self) -> MoEConfig:
        """One always-on expert with (A + shared) times the hidden size: the same active MACs
        per token (without the gate's few), all dense. The baseline MoE is measured against."""
        return replace(
            self, num_experts=1, top_k=1, gate="noisy_topk", groups=1, group_top_k=1, shared_experts=0,
            expert_ratio=self.expert_ratio * (self.active_experts + self.shared_experts),
        )


@dataclass(frozen=True)
class GateOutput:
    """Routing decisions for N tokens."""

    expert_idx: torch.Tensor  # [N, A] int64 chosen experts, rank order
    weights: torch.Tensor  # [N, A] combine weights
    mask: torch.Tensor  # [N, A] bool: assignment used (GShard random routing may drop a 2nd choice)
    probs: torch.Tensor  # [N, E] router distribution over all experts (balance loss, fallback order)
    logits: list[torch.Tensor]  # every gate level's logits (z-loss); empty without a gate


class Gate(nn.Module):
    """Flat or hierarchical top-k gate (see the module docstring)."""

    def __init__(self, cfg: MoEConfig, width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.experts_per_group = cfg.num_experts // cfg.groups
        self.w_expert = nn.Linear(width, cfg.num_experts, bias=False)
        self.w_group = nn.Linear(width, cfg.groups, bias=False) if cfg.groups > 1 else None
        noisy = cfg.gate == "noisy_topk"
        self.noise_expert = nn.Linear(width, cfg.num_experts, bias=False) if noisy else None
        self.noise_group = nn.Linear(width, cfg.groups, bias=False) if noisy and cfg.groups > 1 else None
        for lin in (self.w_expert, self.w_group):  # start near uniform routing (Switch §2.4: small init)
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.01)
        for lin in (self.noise_expert, self.noise_group):
            if lin is not None:
                nn.init.zeros_(lin.weight)

    def _noisy(self, x: torch.Tensor, logits: torch.Tensor, noise: nn.Linear | None) -> torch.Tensor:
        if noise is None or not self.training:
            return logits
        return logits + torch.randn_like(logits) * F.softplus(noise(x))

    def _pick(self, clean: torch.Tensor, noisy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over the last axis: (indices, weights) per the gate's weighting rule."""
        top_v, top_i = noisy.topk(k, dim=-1)
        if self.cfg.gate == "switch":
            return top_i, F.softmax(clean, dim=-1).gather(-1, top_i)
        return top_i, F.softmax(top_v, dim=-1)

    def forward(self, x: torch.Tensor) -> GateOutput:
        """x: [N, W] token summaries -> routing decisions."""
        cfg, n = self.cfg, x.shape[0]
        z_e = self.w_expert(x)  # [N, E]
        if self.w_group is None:
            idx, w = self._pick(z_e, self._noisy(x, z_e, self.noise_expert), cfg.top_k)  # [N, A]
            probs = F.softmax(z_e, dim=-1)
            logits = [z_e]
        else:
            g, m = cfg.groups, self.experts_per_group
            z_g = self.w_group(x)  # [N, G]
            gi, gw = self._pick(z_g, self._noisy(x, z_g, self.noise_group), cfg.group_top_k)  # [N, kg]
            z_in = z_e.view(n, g, m)  # [N, G, M]
            noisy_in = self._noisy(x, z_e, self.noise_expert).view(n, g, m)
            sel = gi.unsqueeze(-1).expand(n, cfg.group_top_k, m)  # [N, kg, M]
            ei, ew = self._pick(z_in.gather(1, sel), noisy_in.gather(1, sel), cfg.top_k)  # [N, kg, k]
            idx = (gi.unsqueeze(-1) * m + ei).reshape(n, -1)  # global expert ids [N, A]
            w = (gw.unsqueeze(-1) * ew).reshape(n, -1)
            probs = (F.softmax(z_g, dim=-1).unsqueeze(-1) * F.softmax(z_in, dim=-1)).reshape(n, -1)  # [N, E]
            logits = [z_g, z_in]
        mask = torch.ones_like(idx, dtype=torch.bool)
        if cfg.gate == "gshard" and self.training:
            # random routing: the 2nd choice (of each group) is used with probability 2·g_2
            second = w.view(n, -1, 2)[..., 1]  # [N, kg]
            use = torch.rand_like(second) < 2 * second.detach()
            mask = mask.view(n, -1, 2).clone()
            mask[..., 1] = use
            mask = mask.view(n, -1)
        return GateOutput(expert_idx=idx, weights=w, mask=mask, probs=probs, logits=logits)


class _NoGate(nn.Module):
    """One expert: every token goes to it with weight 1 (a dense residual block)."""

    def forward(self, x: torch.Tensor) -> GateOutput:
        n = x.shape[0]
        ones = x.new_ones(n, 1)
        return GateOutput(expert_idx=torch.zeros(n, 1, dtype=torch.int64, device=x.device), weights=ones, mask=torch.ones(n, 1, dtype=torch.bool, device=x.device), probs=ones, logits=[])


def make_gate(cfg: MoEConfig, width: int) -> nn.Module:
    """The gate for ``cfg`` over ``width`` summary features (none for a single expert)."""
    return _NoGate() if cfg.num_experts == 1 else Gate(cfg, width)
