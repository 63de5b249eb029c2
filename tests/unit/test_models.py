"""DynamicNet: every backbone through one early-exit interface, compaction, MACs, validation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynray.errors import ConfigError, InputValidationError, UnknownNameError
from dynray.evaluation import collect_exit_outputs, simulate
from dynray.models import DynamicNetConfig, StopAtExit, build, config_from_dict, config_to_dict
from dynray.models.backbones import BACKBONES, register_backbone
from dynray.models.moe import MoEConfig
from dynray.thresholds import ThresholdRule

CONFIGS = {
    "cnn": DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 2), exit_hidden=8),
    "cnn-strided": DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 2), strides=(2, 2, 1)),
    "cnn-cifar": DynamicNetConfig(input_shape=(3, 32, 32), widths=(4, 8, 8, 16), layers=(1, 1, 1, 1), strides=(1, 2, 1, 1), stem_kernel=3),
    "mlp": DynamicNetConfig(backbone="mlp", input_shape=(20,), widths=(16, 16, 8), layers=(1, 2, 1)),
    # MoE stages through the same interface: a flat top-2 block mid-network, and hierarchical
    # switch blocks at the first and the last stage
    "cnn-moe": DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8, moe=MoEConfig(stages=(1,), num_experts=4, top_k=2, expert_ratio=0.5)),
    "mlp-moe-hier": DynamicNetConfig(backbone="mlp", input_shape=(20,), widths=(16, 16, 8), layers=(1, 1, 1), moe=MoEConfig(stages=(0, 2), num_experts=4, top_k=1, groups=2, gate="switch", capacity_factor_eval=4.0)),
}


def _input(cfg: DynamicNetConfig, n: int = 32) -> torch.Tensor:
    return torch.rand(n, *cfg.input_shape, generator=torch.Generator().manual_seed(1))


def test_every_registered_backbone_is_covered():
    assert set(BACKBONES) <= {c.backbone for c in CONFIGS.values()}


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_exits_interface(name):
    cfg = CONFIGS[name]
    model = build(cfg).eval()
    x = _input(cfg)
    out = model.forward_exits(x, StopAtExit(exit=-1))
    assert out.logits.shape == (32, cfg.num_classes)
    assert (out.exit_index == cfg.num_exits - 1).all()
    # stopping everyone at the last exit gives exactly the full network's answer
    assert torch.allclose(out.logits, model.forward_full(x), atol=1e-6)
    assert (out.macs == model.mac_profile.cumulative[-1]).all()
    first = model.forward_exits(x, StopAtExit(exit=0))
    assert (first.exit_index == 0).all() and first.stage_batch == (32,)
    assert torch.allclose(first.logits, model(x)[0], atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_macs_match_flop_counter(name):
    """Our analytic MACs per stage and per exit head equal FlopCounterMode's FLOPs / 2."""
    cfg = CONFIGS[name]
    model = build(cfg).eval()
    h = _input(cfg, n=3)
    for k, (stage, head) in enumerate(zip(model.stages, model.exits)):
        with FlopCounterMode(display=False) as fc:
            h2 = stage(h)
        assert fc.get_total_flops() == 2 * 3 * model.mac_profile.stage[k], f"stage {k}"
        with FlopCounterMode(display=False) as fc:
            head(h2)
        assert fc.get_total_flops() == 2 * 3 * model.mac_profile.exit[k], f"exit {k}"
        h = h2
    with FlopCounterMode(display=False) as fc:
        model.forward_full(_input(cfg, n=3))
    assert fc.get_total_flops() == 2 * 3 * model.mac_profile.full


def test_compaction_shrinks_the_batch_each_stage_sees():
    cfg = CONFIGS["cnn"]
    model = build(cfg).eval()
    x = _input(cfg, n=64)
    # stop the first half of the batch at exit 0 and a quarter more at exit 1
    rule = _IndexRule(stop_at={0: 32, 1: 16})
    calls = []
    hooks = [s.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0])) for s in model.stages]
    out = model.forward_exits(x, rule)
    for hk in hooks:
        hk.remove()
    assert calls == [64, 32, 16] == list(out.stage_batch)
    assert torch.bincount(out.exit_index).tolist() == [32, 16, 16]
    # the samples that left early were not recomputed: their logits come from their exit
    all_logits = model(x)
    for k in range(3):
        sel = out.exit_index == k
        assert torch.allclose(out.logits[sel], all_logits[k][sel], atol=1e-5)
    cum = model.mac_profile.cumulative
    assert out.macs.double().mean() == pytest.approx((32 * cum[0] + 16 * cum[1] + 16 * cum[2]) / 64)


class _IndexRule:
    """Stops the first n running samples at exit k (to control compaction exactly)."""

    def __init__(self, stop_at):
        self.stop_at = stop_at

    def stop(self, k, logits, complexity, prev_pred=None):
        m = torch.zeros(logits.shape[0], dtype=torch.bool)
        m[: self.stop_at.get(k, 0)] = True
        return m


@pytest.mark.parametrize("name", CONFIGS)
def test_stage_ranges_chained_one_by_one_are_forward_exits(name):
    """forward_exits is the range [0, K); K one-stage ranges, each resuming from the last's
    continuation, give the same logits, exits and MACs bit for bit."""
    cfg = CONFIGS[name]
    model = build(cfg).eval()
    x = _input(cfg, n=40)
    rule = _IndexRule(stop_at={0: 10, 1: 7, 2: 5})  # a mix of exits, stage by stage
    ref = model.forward_exits(x, rule)
    K = model.num_exits
    logits = torch.full_like(ref.logits, float("nan"))
    exit_index = torch.full((40,), -1, dtype=torch.int64)
    macs = torch.zeros(40, dtype=torch.int64)
    pos = torch.arange(40)  # positions in x of the samples entering the next range
    h, cx, prev, trace = model.validate_input(x), torch.zeros(40, 0), None, []
    for k in range(K):
        r = model.forward_range(h, k, k + 1, rule, cx, prev)
        assert r.done_exit == ((k,) if r.done else ())
        for d, lg in zip(r.done, r.done_logits, strict=True):
            logits[pos[d]] = lg
            exit_index[pos[d]] = k
        assert torch.equal(r.exit_index, torch.full((pos.numel(),), k))  # left here, or ran through exit k
        macs[pos] += r.macs
        trace += r.stage_batch
        if r.cont is None:
            assert k == K - 1 or sum(rule.stop_at.get(j, 0) for j in range(k + 1)) >= 40
            break
        c = r.cont
        assert c.h.shape[0] == c.complexity.shape[0] == c.prev_pred.shape[0] == c.logits.shape[0] == c.positions.numel()
        assert torch.equal(c.prev_pred, c.logits.argmax(dim=1))
        pos, h, cx, prev = pos[c.positions], c.h, c.complexity, c.prev_pred
    assert k == K - 1, "the last exit answers every sample still running"
    assert torch.equal(logits, ref.logits) and torch.equal(exit_index, ref.exit_index) and torch.equal(macs, ref.macs)
    assert tuple(trace) == ref.stage_batch
    assert torch.bincount(ref.exit_index, minlength=K).tolist()[: K - 1] == [rule.stop_at[j] for j in range(K - 1)]


def test_range_output_groups_answers_by_exit(tiny_cnn):
    x = _input(tiny_cnn.cfg, n=16)
    r = tiny_cnn.forward_range(x, 0, 2, _IndexRule(stop_at={0: 6, 1: 4}), torch.zeros(16, 0))
    # groups in stage order, positions of the batch that entered, no sample twice
    assert r.done_exit == (0, 1) and [d.numel() for d in r.done] == [6, 4]
    assert torch.equal(r.done[0], torch.arange(6)) and torch.equal(r.done[1], torch.arange(6, 10))
    assert torch.equal(r.cont.positions, torch.arange(10, 16))
    assert r.exit_index.tolist() == [0] * 6 + [1] * 10  # the continuing ones ran through exit 1 = stop-1
    cum = tiny_cnn.mac_profile.cumulative
    assert r.macs.tolist() == [cum[0]] * 6 + [cum[1]] * 10
    assert r.stage_batch == (16, 10) and r.rerouted is None
    everyone = tiny_cnn.forward_range(x, 0, 2, StopAtExit(exit=0), torch.zeros(16, 0))
    assert everyone.cont is None and everyone.stage_batch == (16,) and everyone.done_exit == (0,)


def test_forward_exits_equals_simulation_on_cached_outputs(tiny_cnn):
    x = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(4))
    tiny_cnn.complexity.fit(x)
    rec = collect_exit_outputs(tiny_cnn, x, y)
    probe = ThresholdRule(thresholds=(0.0, 0.0), complexity_weight=0.1, agreement_bonus=0.1)
    # medians of the untrained model's scores: about half the samples stop at each exit
    taus = tuple(float(probe.score(k, rec.logits[k], rec.complexity, rec.prev_pred(k)).median()) for k in range(2))
    rule = ThresholdRule(thresholds=taus, complexity_weight=0.1, agreement_bonus=0.1)
    out = tiny_cnn.forward_exits(x, rule)
    sim = simulate(rec, rule)
    assert 0 < int((out.exit_index == 0).sum()) < 200  # a real mix of exits
    assert torch.equal(out.exit_index, sim.exit_index)
    assert float(out.macs.double().mean()) == pytest.approx(sim.mean_macs)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(4, 1, 27, 28), "wrong input shape"),
        (torch.rand(4, 784), "wrong input shape"),
        (torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8), "floating point"),
        (torch.full((4, 1, 28, 28), float("nan")), "NaN"),
        (torch.empty(0, 1, 28, 28), "wrong input shape"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_model_api_refuses_bad_input(tiny_cnn, bad, match):
    with pytest.raises(InputValidationError, match=match) as e:
        tiny_cnn.forward_exits(bad, StopAtExit())
    assert "fix:" in str(e.value)


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="one entry per stage"):
        DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1))
    with pytest.raises(ConfigError, match="at least 2 stages"):
        DynamicNetConfig(widths=(4,), layers=(1,))
    with pytest.raises(UnknownNameError, match="cnn"):
        build(DynamicNetConfig(backbone="cnnn"))
    cfg = CONFIGS["cnn-cifar"]
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown DynamicNetConfig fields"):
        config_from_dict({**config_to_dict(cfg), "depth": 3})


def test_duplicate_backbone_name_raises():
    with pytest.raises(ConfigError, match="registered twice"):
        register_backbone("cnn")(lambda cfg: None)


def test_fast_pool_equals_avg_pool():
    from dynray.models.backbones import _Pool

    x = torch.randn(3, 5, 14, 14)
    for f in (2, 7):
        assert torch.allclose(_Pool(f)(x), torch.nn.functional.avg_pool2d(x, f), atol=1e-6)


def test_bn_folding_keeps_the_function(tiny_cnn):
    from dynray.models.fuse import fused_copy

    tiny_cnn.train()
    tiny_cnn(torch.rand(16, 1, 28, 28))  # move the BatchNorm statistics off their defaults
    tiny_cnn.eval()
    fused = fused_copy(tiny_cnn)
    x = torch.rand(8, 1, 28, 28)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert torch.allclose(fused.forward_full(x), tiny_cnn.forward_full(x), atol=1e-5)
    assert fused.mac_profile == tiny_cnn.mac_profile
