"""Complexity features, the multi-exit loss, fine-tuning helpers and one local epoch."""

from __future__ import annotations

import pytest
import torch

from dynray.complexity import FEATURE_NAMES, ComplexityFeatures, raw_features
from dynray.errors import ConfigError
from dynray.finetune import FinetuneConfig, param_groups, trainable_stages
from dynray.models import DynamicNetConfig, MultiExitLoss, build
from dynray.training import TrainConfig, train_epoch


def test_complexity_features_are_vectorised_and_normalised():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=g) * (torch.rand(64, 1, 1, 1, generator=g) > 0.5)
    per_sample = torch.cat([raw_features(x[i : i + 1]) for i in range(64)])
    assert torch.allclose(raw_features(x), per_sample, atol=1e-6)
    cf = ComplexityFeatures().fit(x)
    z = cf(x)
    assert z.shape == (64, len(FEATURE_NAMES)) and z.min() >= 0 and z.max() <= 1
    assert bool(cf.fitted)
    assert set(cf.stats()) == set(FEATURE_NAMES)


def test_complexity_orders_blank_below_noise():
    blank = torch.zeros(1, 1, 28, 28)
    noise = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    stroke = torch.zeros(1, 1, 28, 28)
    stroke[..., 10:18, 12:15] = 1.0
    cf = ComplexityFeatures().fit(torch.cat([blank, noise, stroke] * 4))
    zb, zn, zs = cf(blank)[0], cf(noise)[0], cf(stroke)[0]
    assert (zn >= zb).all() and zn.sum() > zs.sum() > zb.sum()


def test_complexity_stats_travel_in_the_state_dict():
    m = build(DynamicNetConfig(widths=(4, 8), layers=(1, 1), strides=(2, 1)))
    m.complexity.fit(torch.rand(20, 1, 28, 28))
    m2 = build(m.cfg)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.complexity.lo, m.complexity.lo) and bool(m2.complexity.fitted)
    with pytest.raises(ConfigError):
        ComplexityFeatures().fit(torch.rand(1, 1, 28, 28))


def test_multi_exit_loss_weights_and_distillation():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (16,), generator=g)
    logits = [torch.randn(16, 10, generator=g) for _ in range(3)]
    plain = MultiExitLoss()(logits, y, (1.0, 0.0, 0.0))
    ce0 = torch.nn.functional.cross_entropy(logits[0], y)
    assert plain.total.item() == pytest.approx(ce0.item(), rel=1e-6)
    # an early exit identical to the last one has zero distillation loss
    same = [logits[2].clone(), logits[1], logits[2]]
    kd_only = MultiExitLoss(distill_alpha=1.0)(same, y, (1.0, 0.0, 0.0))
    assert kd_only.total.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        MultiExitLoss()(logits, y, (1.0, 1.0))


def test_trainable_stages_plans():
    assert trainable_stages(None, 3, 0) == {0, 1, 2}
    assert trainable_stages(FinetuneConfig(freeze_backbone=True), 3, 5) == set()
    assert trainable_stages(FinetuneConfig(unfreeze_last=1), 3, 0) == {2}
    gradual = FinetuneConfig(gradual=True)
    assert [sorted(trainable_stages(gradual, 3, e)) for e in range(4)] == [[], [2], [1, 2], [0, 1, 2]]
    with pytest.raises(ConfigError):
        FinetuneConfig(freeze_backbone=True, unfreeze_last=1)


def test_frozen_backbone_does_not_move_and_heads_do(mnist5k):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, workers=1, batch_size=64, finetune=FinetuneConfig(freeze_backbone=True, head_lr=1e-2))
    model = build(cfg.model_config())
    model.complexity.fit(mnist5k["train"].images)
    groups = param_groups(model.stages, model.exits, head_lr=1e-2, backbone_lr=1e-2)
    for gr in groups:
        gr["initial_lr"] = gr["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_epoch(model, model, mnist5k["val"], opt, cfg, 0)
    after = model.state_dict()
    stage_keys = [k for k in before if k.startswith("stages.")]
    exit_keys = [k for k in before if k.startswith("exits.") and k.endswith("weight")]
    assert all(torch.equal(before[k], after[k]) for k in stage_keys)  # weights and BN stats
    assert all(not torch.equal(before[k], after[k]) for k in exit_keys)
