"""Mixture of experts: gates, capacity, losses, sparse dispatch, failover, MoE stages in DynamicNet."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynray.errors import ConfigError
from dynray.models import DynamicNetConfig, StopAtExit, build, config_from_dict, config_to_dict
from dynray.models.gating import Gate
from dynray.models.moe import ExpertReplies, LocalExperts, MoEBlock, MoEConfig, MoEUsage, balance_loss, capacity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _block(kind: str = "mlp", width: int = 8, **kw) -> MoEBlock:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"stages": (0,), "num_experts": 4, "top_k": 2, "expert_ratio": 1.0, **kw})
    spatial = (5, 5) if kind == "cnn" else None
    return MoEBlock(cfg, kind=kind, width=width, block=0, spatial=spatial)


def _tokens(n: int = 32, width: int = 8, kind: str = "mlp") -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    shape = (n, width, 5, 5) if kind == "cnn" else (n, width)
    return torch.relu(torch.randn(*shape, generator=g))  # block inputs are post-ReLU


@pytest.mark.parametrize(
    "kw",
    [
        {"gate": "noisy_topk", "top_k": 2},
        {"gate": "noisy_topk", "top_k": 3},
        {"gate": "gshard", "top_k": 2},
        {"gate": "noisy_topk", "top_k": 2, "num_experts": 8, "groups": 2, "group_top_k": 2},
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_gate_weights_of_the_chosen_experts_sum_to_one(kw, training):
    cfg = MoEConfig(**kw)
    gate = Gate(cfg, 8).train(training)
    torch.nn.init.normal_(gate.w_expert.weight)  # away from the near-uniform init
    out = gate(torch.randn(64, 8))
    assert out.expert_idx.shape == out.weights.shape == (64, cfg.active_experts)
    assert torch.allclose(out.weights.sum(dim=1), torch.ones(64), atol=1e-6)
    # a token never picks one expert twice, and probs is a distribution over all experts
    assert all(len(set(r)) == cfg.active_experts for r in out.expert_idx.tolist())
    assert torch.allclose(out.probs.sum(dim=1), torch.ones(64), atol=1e-6)


def test_switch_gate_weight_is_the_router_probability():
    gate = Gate(MoEConfig(gate="switch", top_k=1), 8).eval()
    torch.nn.init.normal_(gate.w_expert.weight)
    x = torch.randn(16, 8)
    out = gate(x)
    p = F.softmax(gate.w_expert(x), dim=1)
    assert torch.equal(out.expert_idx[:, 0], p.argmax(dim=1))
    assert torch.allclose(out.weights[:, 0], p.max(dim=1).values)


def test_noisy_gate_adds_noise_only_in_training():
    gate = Gate(MoEConfig(), 8)
    torch.nn.init.normal_(gate.noise_expert.weight)
    x = torch.randn(256, 8)
    gate.eval()
    assert torch.equal(gate(x).expert_idx, gate(x).expert_idx)
    gate.train()
    assert not torch.equal(gate(x).expert_idx, gate(x).expert_idx)


def test_capacity_limit_holds_and_dropped_tokens_pass_through():
    blk = _block(capacity_factor_eval=0.5, min_capacity=1).eval()
    torch.nn.init.normal_(blk.gate.w_expert.weight, std=3.0)  # skewed routing: some experts overflow
    x = _tokens(40)
    out = blk.forward_moe(x)
    cap = capacity(40, blk.cfg, training=False)
    assert cap == math.ceil(0.5 * 40 * 2 / 4) == 10
    assert out.expert_tokens.max() <= cap
    assert out.dropped > 0 and out.dropped == 80 - int(out.expert_tokens.sum())
    # a token with no expert left is the residual input itself (relu of a non-negative h)
    alone = out.active == 0
    assert alone.any()
    assert torch.equal(out.y[alone], x[alone])
    # the priority rule: first choices are dropped only once an expert is full of first choices
    g = blk.gate(x.mean(dim=0, keepdim=True).expand(40, -1))  # identical tokens -> identical choices
    same = blk.forward_moe(x.mean(dim=0, keepdim=True).expand(40, -1).contiguous())
    assert int(same.expert_tokens[g.expert_idx[0, 0]]) == cap


def test_balance_loss_is_minimal_for_uniform_routing():
    e, n = 4, 400
    uniform_probs = torch.full((n, e), 1 / e)
    uniform_idx = torch.arange(n).remainder(e).unsqueeze(1)
    assert balance_loss(uniform_probs, uniform_idx, e).item() == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 5.0):
        logits = torch.randn(n, e, generator=g) * scale + torch.tensor([1.0, 0.0, 0.0, -1.0]) * scale
        probs = logits.softmax(dim=1)
        assert balance_loss(probs, probs.argmax(dim=1, keepdim=True), e).item() > 1.0
    # and gradient descent on the loss drives a skewed router towards uniform
    z = torch.tensor([[2.0, 0.5, 0.0, -1.0]]).repeat(64, 1).requires_grad_()
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(400):
        p = z.softmax(dim=1)
        loss = e * (p.mean(0) * p.mean(0)).sum()  # f = P, the differentiable relaxation
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(z.softmax(dim=1).mean(0), torch.full((e,), 0.25), atol=1e-2)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sparse_dispatch_calls_only_the_chosen_experts_once(kind):
    blk = _block(kind).eval()
    torch.nn.init.normal_(blk.gate.w_expert.weight, std=2.0)
    x = _tokens(12, kind=kind)
    calls: dict[int, list[int]] = {}
    for e, ex in enumerate(blk.experts):
        ex.register_forward_hook(lambda m, i, o, e=e: calls.setdefault(e, []).append(i[0].shape[0]))
    out = blk.forward_moe(x)
    g = blk.gate(x.mean(dim=(2, 3)) if kind == "cnn" else x)
    chosen = torch.bincount(g.expert_idx.reshape(-1), minlength=4)
    assert {e: sum(v) for e, v in calls.items()} == {e: int(c) for e, c in enumerate(chosen) if c}
    assert all(len(v) == 1 for v in calls.values())  # one batched call per expert
    # and the sparse result equals the dense reference (every expert on every token, masked)
    dense = torch.stack([ex(x) for ex in blk.experts], dim=1)  # [N, E, *D]
    w = torch.zeros(12, 4).scatter(1, g.expert_idx, g.weights)
    ref = torch.relu(x + (dense * w.view(12, 4, *([1] * (x.dim() - 1)))).sum(dim=1))
    assert torch.allclose(out.y, ref, atol=1e-5)
    assert (out.active == 2).all() and not out.rerouted.any()


class _FailingRunner:
    """Local experts, except the listed ones, which never answer."""

    def __init__(self, experts, dead):
        self.local, self.dead, self.calls = LocalExperts(experts), set(dead), []

    def run(self, block, batches):
        self.calls.append(sorted(batches))
        live = {e: x for e, x in batches.items() if e not in self.dead}
        return ExpertReplies(outputs=self.local.run(block, live).outputs, failed=frozenset(set(batches) & self.dead))


def test_failed_expert_tokens_go_to_the_next_best_expert_and_are_flagged():
    blk = _block().eval()
    torch.nn.init.normal_(blk.gate.w_expert.weight, std=2.0)
    x = _tokens(64)
    g = blk.gate(x)
    dead = int(g.expert_idx[0, 0])
    blk.runner = _FailingRunner(blk.experts, [dead])
    out = blk.forward_moe(x)
    hit = (g.expert_idx == dead).any(dim=1)
    assert torch.equal(out.rerouted, hit) and hit.any()
    assert (out.active == 2).all()  # every token still got two live experts
    assert torch.isfinite(out.y).all() and out.y.shape == x.shape
    # the substitute is the best remaining expert by gate score, with the failed slot's weight
    t = int(hit.nonzero()[0])
    score = g.probs[t].clone()
    score[g.expert_idx[t]] = -1
    alt = int(score.argmax())
    w = g.weights[t]
    ref = x[t] + sum(w[a] * blk.experts[alt if int(e) == dead else int(e)](x[t : t + 1])[0] for a, e in enumerate(g.expert_idx[t]))
    assert torch.allclose(out.y[t], torch.relu(ref), atol=1e-5)
    # every expert dead: every token still answers, through the residual path
    blk.runner = _FailingRunner(blk.experts, range(4))
    out = blk.forward_moe(x)
    assert out.rerouted.all() and (out.active == 0).all() and torch.equal(out.y, x)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k is larger than the experts"),
        ({"num_experts": 4, "top_k": 3, "groups": 2}, "experts per group"),
        ({"capacity_factor_train": 0.0}, "capacity factors must be > 0"),
        ({"capacity_factor_eval": -1.0}, "capacity factors must be > 0"),
        ({"num_experts": 6, "groups": 4}, "groups must divide num_experts"),
        ({"gate": "switch", "top_k": 2}, "switch gate is top-1"),
        ({"gate": "topk"}, "unknown MoE gate"),
    ],
)
def test_bad_moe_configs_are_refused_with_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        MoEConfig(**kw)
    assert "fix:" in str(e.value)


def test_moe_stage_past_the_last_stage_is_refused():
    with pytest.raises(ConfigError, match="past the last stage"):
        DynamicNetConfig(moe=MoEConfig(stages=(3,)))


def _moe_net(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8, moe=MoEConfig(stages=(1, 2), expert_ratio=0.5, **kw)))


def test_moe_config_round_trips_and_dense_twin_has_equal_active_macs():
    net = _moe_net()
    assert config_from_dict(config_to_dict(net.cfg)) == net.cfg
    twin_cfg = net.cfg.moe.dense_equivalent()
    assert twin_cfg.num_experts == 1 and twin_cfg.active_experts == 1
    twin = build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8, moe=twin_cfg))
    gate_macs = sum(8 * 4 for _ in net.moe_blocks())  # one gate Linear(8 -> 4) per block
    assert net.mac_profile.full == twin.mac_profile.full + gate_macs


def test_moe_stages_keep_early_exits_compaction_and_exact_active_macs():
    net = _moe_net(capacity_factor_eval=0.25, min_capacity=1).eval()
    for b in net.moe_blocks():
        torch.nn.init.normal_(b.gate.w_expert.weight, std=3.0)
    x = torch.rand(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    full = net.forward_exits(x, StopAtExit(-1))
    assert torch.allclose(full.logits, net(x)[-1], atol=1e-5)
    # MACs count only the experts that ran: the profile's A experts, less each dropped one
    dropped_macs = sum((b.cfg.active_experts - b.last.active) * b.expert_macs for b in net.moe_blocks())
    assert torch.equal(full.macs, net.mac_profile.cumulative[-1] - dropped_macs)
    assert (full.macs < net.mac_profile.cumulative[-1]).any()
    # compaction: samples stopped at exit 0 never reach the MoE blocks
    calls = []
    for b in net.moe_blocks():
        b.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    first = net.forward_exits(x, StopAtExit(0))
    assert calls == [] and (first.macs == net.mac_profile.cumulative[0]).all()
    assert first.rerouted is not None and not first.rerouted.any()


def test_hierarchical_moe_runs_and_learns():
    """A hierarchical MoE MLP learns a task whose classes need different experts."""
    torch.manual_seed(0)
    cfg = DynamicNetConfig(
        backbone="mlp", input_shape=(16,), num_classes=4, widths=(32, 32), layers=(1, 1), strides=(1, 1),
        moe=MoEConfig(stages=(0, 1), num_experts=8, top_k=2, groups=2, group_top_k=1, expert_ratio=1.0),
    )
    net = build(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 16, generator=g)
    y = ((x[:, 0] > 0).long() * 2 + (x[:, 1] * x[:, 2] > 0).long())  # XOR-like: needs non-linear features
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    usage = MoEUsage()
    losses = []
    for step in range(250):
        idx = torch.randint(0, 1024, (128,), generator=g)
        net.train()
        loss = F.cross_entropy(net(x[idx])[-1], y[idx]) + net.moe_aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        usage.add(net.moe_outputs())
    net.eval()
    acc = (net(x)[-1].argmax(1) == y).float().mean().item()
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    assert acc > 0.85  # chance is 0.25
    # both groups' experts were used, and the gate's weights got gradients
    s = usage.summary()
    assert len(s["expert_share"]) == 2 and all(sum(x > 0 for x in block) >= 6 for block in s["expert_share"])
    assert net.moe_blocks()[0].gate.w_group.weight.grad is not None


def test_shared_experts_see_every_token_and_count_in_the_dense_twin():
    net = _moe_net(gate="switch", top_k=1, shared_experts=1).eval()
    twin = build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8, moe=net.cfg.moe.dense_equivalent()))
    assert net.cfg.moe.dense_equivalent().expert_ratio == pytest.approx(2 * net.cfg.moe.expert_ratio)
    assert net.mac_profile.full == twin.mac_profile.full + sum(8 * 4 for _ in net.moe_blocks())
    seen = []
    for b in net.moe_blocks():
        b.shared[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    net(torch.rand(24, 1, 28, 28))
    assert seen == [24, 24]
