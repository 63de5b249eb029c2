"""The class-conditional GAN (pure torch, no Ray): it trains, its samples are the classes they
were drawn for, it round-trips through the registry, and the low-data split helpers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynray.data import Split, subsample
from dynray.errors import ConfigError, IntegrityError, RegistryError
from dynray.gan import GANConfig, Generator, diff_augment, label_accuracy, load_generator, sample, save_generator, save_grid, synthetic_split, train_cgan
from dynray.registry import ModelRegistry
from dynray.store import save_model
from dynray.training import TrainConfig, training_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(width=16, latent=32, batch_size=32, lr=1e-3)


@pytest.fixture(scope="module")
def small_gan(mnist5k) -> Generator:
    """A small cGAN trained on 1,050 training digits (about 20 s on one thread)."""
    real = subsample(mnist5k["train"], 0.3, seed=0)
    return train_cgan(real, GANConfig(steps=600, seed=0, **SMALL), log_every=0)


def test_gan_trains_and_its_samples_classify_above_chance(small_gan, trained_net):
    """A classifier trained on the real digits labels the samples as the class they were drawn
    for far above chance (0.1), and far above the same generator untrained."""
    trained = label_accuracy(trained_net.forward_full, small_gan, 500, seed=1)
    torch.manual_seed(0)
    untrained = label_accuracy(trained_net.forward_full, Generator(small_gan.cfg).eval(), 500, seed=1)
    print(f"samples labelled as their class: trained {trained:.3f}, untrained {untrained:.3f}")
    assert trained >= 0.6, trained
    assert untrained <= 0.3, untrained


def test_samples_are_balanced_in_range_and_reproducible(small_gan):
    x, y = sample(small_gan, 50, seed=3)
    assert x.shape == (50, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10
    assert torch.equal(sample(small_gan, 50, seed=3)[0], x) and not torch.equal(sample(small_gan, 50, seed=4)[0], x)
    assert sample(small_gan, 0)[0].shape == (0, 1, 28, 28)


def test_two_noises_of_one_class_give_different_images(small_gan):
    """No collapse to one image per class: samples of one label differ from each other."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = small_gan(torch.randn(20, small_gan.cfg.latent, generator=gen), torch.full((20,), 3))
    spread = (x - x.mean(0, keepdim=True)).abs().mean()
    assert spread > 0.02, float(spread)


def test_diff_augment_translates_and_cuts_out_differentiably():
    x = torch.rand(8, 1, 28, 28, requires_grad=True)
    out = diff_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    assert (out == 0).float().mean() > (x == 0).float().mean()  # zero padding and the cut-out square
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_generator_round_trips_through_the_registry(small_gan, tmp_path, tiny_cnn):
    reg = ModelRegistry(tmp_path / "home")
    info = save_generator(reg, "cgan-mnist-5k", small_gan, dataset="mnist-5k", extra={"fraction": 0.3})
    g, loaded = load_generator(reg, "cgan-mnist-5k")
    assert loaded.ref == info.ref == "cgan-mnist-5k:v1" and loaded.meta["kind"] == "cgan" and g.cfg == small_gan.cfg
    assert torch.equal(sample(g, 20, seed=5)[0], sample(small_gan, 20, seed=5)[0])
    with pytest.raises(RegistryError, match="no readable models"):  # a generator is never the default model
        reg.resolve(None)
    save_model(reg, "dynnet-mnist-5k", tiny_cnn, dataset="mnist-5k", rule=None, metrics={})
    assert reg.resolve(None).name == "dynnet-mnist-5k"
    with pytest.raises(IntegrityError, match="not a cGAN generator"):
        load_generator(reg, "dynnet-mnist-5k")
    grid = save_grid(g, tmp_path / "grid.png", per_class=4)
    assert open(grid, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_gan_inputs_that_cannot_work_are_refused(mnist5k, small_gan):
    with pytest.raises(ConfigError, match="divisible by 4"):
        GANConfig(input_shape=(1, 30, 30))
    with pytest.raises(ConfigError, match="must be >= 1"):
        GANConfig(steps=0)
    with pytest.raises(ConfigError, match="ema must lie in"):
        GANConfig(ema=1.0)
    with pytest.raises(ConfigError, match="does not match the data"):
        train_cgan(subsample(mnist5k["train"], 0.01), GANConfig(input_shape=(3, 32, 32)))
    with pytest.raises(ConfigError, match="at least two training images"):
        train_cgan(dataclasses.replace(mnist5k["train"], images=mnist5k["train"].images[:1], labels=mnist5k["train"].labels[:1]), GANConfig())
    with pytest.raises(ConfigError, match="needs samples"):
        label_accuracy(lambda x: x, small_gan, 0)


def test_subsample_takes_the_fraction_of_every_class_by_seed(mnist5k):
    train = mnist5k["train"]
    a, b, c = subsample(train, 0.1, seed=0), subsample(train, 0.1, seed=0), subsample(train, 0.1, seed=1)
    assert torch.bincount(a.labels).tolist() == [35] * 10
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert subsample(train, 1.0) is train
    tiny = subsample(train, 0.0001)
    assert torch.bincount(tiny.labels).tolist() == [1] * 10  # at least one of each class
    with pytest.raises(ConfigError, match="lie in"):
        subsample(train, 0.0)


def test_training_split_adds_synthetic_images_to_the_real_fraction(small_gan):
    cfg = TrainConfig(train_fraction=0.1, seed=2)
    syn = synthetic_split(small_gan, 40, dataset="mnist-5k", seed=0)
    real, data = training_split(cfg, syn)
    assert len(real) == 350 and len(data) == 390
    assert torch.equal(data.images[350:], syn.images) and torch.equal(data.labels[350:], syn.labels)
    real3, data3 = training_split(dataclasses.replace(cfg, real_repeats=3), syn)
    assert torch.equal(real3.images, real.images) and len(data3) == 3 * 350 + 40 and torch.equal(data3.images[350:700], real.images)
    only_real, same = training_split(cfg)
    assert same is only_real and len(only_real) == 350
    bad = Split(name="x", split="train", images=torch.zeros(4, 3, 32, 32), labels=torch.zeros(4, dtype=torch.long), num_classes=10)
    with pytest.raises(ConfigError, match="do not match the training split"):
        training_split(cfg, bad)
    with pytest.raises(ConfigError, match="train_fraction"):
        TrainConfig(train_fraction=1.5)
    with pytest.raises(ConfigError, match="real_repeats"):
        TrainConfig(real_repeats=0)


def test_nearest_distance_sees_copies_of_the_real_set(mnist5k):
    """The bench's copy check: copies of real images sit at distance 0, other digits do not."""
    from dynray.bench.gan import nearest_distance

    real = subsample(mnist5k["train"], 0.1, seed=0)
    assert nearest_distance(real.images[:50], real.labels[:50], real) == 0.0
    other = mnist5k["val"]
    assert nearest_distance(other.images[:50], other.labels[:50], real) > 3.0
