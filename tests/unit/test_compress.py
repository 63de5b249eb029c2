"""Edge compression: int8 quantisation, channel pruning, distillation (pure torch, no Ray)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dynray.compress.distill import Distillation, student_config
from dynray.compress.prune import prune_channels, pruned_widths
from dynray.compress.quant import int8_from_state, int8_state, is_int8, quantize_int8
from dynray.compress.variants import distilled_variant, measure, pruned_variant, size_bytes, student_from_scratch
from dynray.data import Split
from dynray.errors import ConfigError, InputValidationError
from dynray.models import DynamicNetConfig, StopAtExit, build
from dynray.models.defaults import default_moe_config
from dynray.registry import ModelRegistry
from dynray.store import load_model, save_model
from dynray.thresholds import ThresholdRule
from dynray.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _acc(model, split: Split) -> float:
    with torch.no_grad():
        return float((model.forward_full(split.images).argmax(1) == split.labels).float().mean())


@pytest.fixture(scope="module")
def int8_net(trained_net, mnist5k):
    return quantize_int8(trained_net, mnist5k["train"].images[:256])


def test_int8_keeps_accuracy_and_is_4x_smaller(trained_net, int8_net, mnist5k):
    test = mnist5k["test"]
    drop = _acc(trained_net, test) - _acc(int8_net, test)
    assert drop <= 0.01, drop
    assert size_bytes(trained_net) / size_bytes(int8_net) >= 3.0
    assert is_int8(int8_net) and not is_int8(trained_net)
    # the convolutions really are int8 kernels, the heads' linear layers dynamic int8
    mods = list(int8_net.modules())
    assert sum(isinstance(m, torch.ao.nn.intrinsic.quantized.ConvReLU2d) for m in mods) == sum(isinstance(m, torch.nn.Conv2d) for m in trained_net.modules())
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in mods) == sum(isinstance(m, torch.nn.Linear) for m in trained_net.modules())
    assert not any(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in mods)


def test_int8_adaptive_answers_agree_with_float(trained_net, int8_net, mnist5k):
    """Batch compaction runs unchanged on the int8 model: the adaptive answers agree."""
    rule = ThresholdRule(thresholds=(0.9, 0.9))
    x = mnist5k["test"].images[:500]
    a, b = trained_net.forward_exits(x, rule), int8_net.forward_exits(x, rule)
    assert (a.logits.argmax(1) == b.logits.argmax(1)).float().mean() >= 0.98
    assert b.stage_batch[0] == 500 and b.stage_batch[-1] < 500  # some samples left early


def test_int8_state_round_trips_through_safetensors_exactly(int8_net, mnist5k):
    flat = st_load(st_save(int8_state(int8_net)))
    assert all(not t.is_quantized for t in flat.values())
    back = int8_from_state(build(int8_net.cfg), flat)
    x = mnist5k["test"].images[:64]
    with torch.no_grad():
        assert torch.equal(back(x)[-1], int8_net(x)[-1])


def test_int8_variant_registers_and_loads(tmp_path, int8_net, mnist5k):
    reg = ModelRegistry(tmp_path)
    info = save_model(reg, "m-int8", int8_net, dataset="mnist-5k", rule=ThresholdRule(thresholds=(0.9, 0.9)), metrics={})
    assert info.meta["weights_format"].startswith("int8")
    stored = load_model(reg, info.ref)
    x = mnist5k["test"].images[:32]
    with torch.no_grad():
        assert torch.equal(stored.model(x)[-1], int8_net(x)[-1])


def test_int8_refuses_an_empty_calibration_set(trained_net):
    with pytest.raises(InputValidationError, match="calibration set is empty"):
        quantize_int8(trained_net, torch.zeros(0, 1, 28, 28))


def test_int8_keeps_moe_blocks_float_and_runs():
    torch.manual_seed(0)
    moe = build(dataclasses.replace(default_moe_config("mnist-5k"), widths=(8, 16, 16))).eval()
    q = quantize_int8(moe, torch.rand(32, 1, 28, 28))
    out = q.forward_exits(torch.rand(8, 1, 28, 28), StopAtExit())
    assert out.logits.shape == (8, 10) and torch.isfinite(out.logits).all()


def test_pruning_that_keeps_every_channel_is_exact(trained_net, mnist5k):
    """Copying the kept channels is right: a ratio that keeps all of them changes nothing."""
    keep_all = prune_channels(trained_net, 0.01)  # round(16 * 0.99) = 16, 32 -> 32, 64 -> 63
    assert keep_all.cfg.widths[:2] == trained_net.cfg.widths[:2]
    x = mnist5k["test"].images[:64]
    with torch.no_grad():
        a, b = trained_net(x), keep_all(x)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_pruning_halves_the_channels_and_fine_tuning_recovers(trained_net, mnist5k):
    pruned = prune_channels(trained_net, 0.5)
    assert pruned.cfg.widths == pruned_widths(trained_net.cfg.widths, 0.5) == (8, 16, 32)
    assert pruned.mac_profile.full < trained_net.mac_profile.full / 3
    test = mnist5k["test"]
    recipe = TrainConfig(epochs=4, workers=1, lr=2e-3)
    tuned = pruned_variant(trained_net, mnist5k["train"], recipe, ratio=0.5)
    assert _acc(tuned, test) >= _acc(trained_net, test) - 0.03
    assert _acc(tuned, test) > _acc(pruned, test) + 0.1  # fine-tuning is what recovers it


def test_pruning_refuses_moe_and_bad_ratios():
    moe = build(default_moe_config("mnist-5k"))
    with pytest.raises(ConfigError, match="dense cnn"):
        prune_channels(moe, 0.5)
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        pruned_widths((16, 32), 1.0)


def test_distillation_pulls_the_student_to_the_teacher(trained_net, mnist5k):
    """The same student, init and recipe: with the teacher in the loss its softened answers
    end up closer to the teacher's than those of the student trained on labels alone."""
    train, test = mnist5k["train"], mnist5k["test"]
    recipe = TrainConfig(epochs=2, workers=1, seed=0)
    scratch = student_from_scratch(trained_net, train, recipe, width_mult=0.25)
    distilled = distilled_variant(trained_net, train, recipe, width_mult=0.25, alpha=1.0)
    assert scratch.cfg == distilled.cfg == student_config(trained_net.cfg, 0.25)
    x = test.images[:500]
    with torch.no_grad():
        target = torch.softmax(trained_net(x)[-1] / 4.0, dim=1)

        def kl(m):
            return float(torch.nn.functional.kl_div(torch.log_softmax(m(x)[-1] / 4.0, dim=1), target, reduction="batchmean"))

        assert kl(distilled) < 0.95 * kl(scratch), (kl(distilled), kl(scratch))


def test_distillation_refuses_bad_settings(trained_net):
    with pytest.raises(ConfigError, match="alpha"):
        Distillation(teacher=trained_net, alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        Distillation(teacher=trained_net, temperature=0.0)
    with pytest.raises(ConfigError, match="width"):
        student_config(DynamicNetConfig(), 0.0)


def test_measure_reports_size_latency_and_accuracy(int8_net, mnist5k):
    small = dataclasses.replace(mnist5k["test"], images=mnist5k["test"].images[:256], labels=mnist5k["test"].labels[:256])
    s = measure(int8_net, small, reps=3)
    assert s.size_bytes == size_bytes(int8_net) and s.latency_ms_b256 > 0 and s.latency_ms_b1 > 0 and 0.5 < s.accuracy <= 1.0
