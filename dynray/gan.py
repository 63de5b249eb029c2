"""A class-conditional GAN: synthetic training images, one class at a time.

- **Generator**: noise and the label's embedding, a linear layer to a ``4w x H/4 x W/4`` map,
  two (nearest upsample, 3x3 convolution) blocks with class-conditional batch norm (the
  label picks each channel's scale and shift), and a 3x3 convolution to the image (sigmoid:
  values in [0, 1]).
- **Discriminator**: three spectrally normalised convolutions, global sum pooling to a feature
  ``phi(x)``; the score is ``w . phi(x) + e(y) . phi(x)``, the projection discriminator of
  Miyato and Koyama ("cGANs with Projection Discriminator", 2018). An auxiliary classifier on
  ``phi`` (Odena et al., AC-GAN, 2017), trained on real images only, also pushes each fake
  towards its label.
- **Training**: hinge loss, Adam (2e-4, betas 0.0/0.9), DiffAugment (Zhao et al.,
  "Differentiable Augmentation for Data-Efficient GAN Training", 2020): the same random
  translation and cutout on real and fake images before the discriminator, so a GAN trained
  on a few hundred images does not let its discriminator memorise them. Samples come from an
  exponential moving average of the generator's weights.

Plain torch; ``jobs/gan.py`` trains one as a Ray job and saves the generator.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from dynray.data import Split
from dynray.errors import ConfigError, IntegrityError
from dynray.registry import ModelInfo, ModelRegistry, RegistryReader

__all__ = ["GAN_KIND", "GANConfig", "Generator", "Discriminator", "diff_augment", "train_cgan", "sample", "label_accuracy", "synthetic_split", "save_grid",
           "gan_name", "save_generator", "load_generator"]
GAN_KIND = "cgan"
"""``meta["kind"]`` of a registered generator."""
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GANConfig:
    """The conditional GAN and how it trains."""

    input_shape: tuple[int, int, int] = (1, 28, 28)
    """(C, H, W) of the images; H and W divisible by 4."""
    num_classes: int = 10
    """Label classes."""
    latent: int = 64
    """Noise dimensions."""
    width: int = 32
    """Channels of the generator's last block and the discriminator's first convolution."""
    steps: int = 3000
    """Discriminator/generator update pairs."""
    batch_size: int = 64
    """Real (and fake) images per step."""
    lr: float = 1e-3
    """Adam learning rate of both networks."""
    ac_weight: float = 0.2
    """Weight of the auxiliary-classifier loss (0 disables it)."""
    mode_seeking: float = 0.1
    """Weight of the mode-seeking term (Mao et al., MSGAN, 2019): two noises with one label
    must give images that differ in proportion, against collapse to one image per class (0 disables it)."""
    ema: float = 0.999
    """Decay of the generator's weight average that samples are drawn from (0 = last weights);
    it ramps up as ``(1 + step) / (10 + step)``, so a short run is not averaged with its init."""
    diffaug: bool = True
    """Translate and cut out real and fake images alike before the discriminator."""
    seed: int = 0
    """Seeds the initial weights, the noise and the batches."""

    def __post_init__(self) -> None:
        c, h, w = self.input_shape
        if h % 4 or w % 4 or c < 1:
            raise ConfigError("the GAN needs image height and width divisible by 4", got=self.input_shape, fix="use 28x28 or 32x32 images")
        if min(self.steps, self.batch_size, self.latent, self.width) < 1 or self.num_classes < 2:
            raise ConfigError("steps, batch_size, latent and width must be >= 1 and num_classes >= 2",
                              got={"steps": self.steps, "batch_size": self.batch_size, "latent": self.latent, "width": self.width, "num_classes": self.num_classes},
                              fix="e.g. --steps 3000 --batch-size 64 --latent 64 --width 32")
        if not 0 <= self.ema < 1 or self.ac_weight < 0 or self.lr <= 0:
            raise ConfigError("ema must lie in [0, 1), ac_weight >= 0 and lr > 0", got=(self.ema, self.ac_weight, self.lr), fix="e.g. --ema 0.999 --ac-weight 0.5")


class _CondBN(nn.Module):
    """Batch norm whose per-channel scale and shift are picked by the label."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma, self.beta = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: [b, ch, h, w], y: [b]
        return self.bn(x) * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class Generator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, h, w = cfg.input_shape
        self.embed = nn.Embedding(cfg.num_classes, cfg.latent)
        self.fc = nn.Linear(2 * cfg.latent, 2 * cfg.width * (h // 4) * (w // 4))
        self.bn0 = _CondBN(2 * cfg.width, cfg.num_classes)
        self.up1, self.bn1 = nn.ConvTranspose2d(2 * cfg.width, cfg.width, 4, 2, 1), _CondBN(cfg.width, cfg.num_classes)
        self.up2, self.bn2 = nn.ConvTranspose2d(cfg.width, cfg.width, 4, 2, 1), _CondBN(cfg.width, cfg.num_classes)
        self.out = nn.Conv2d(cfg.width, c, 3, padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # z: [b, latent], y: [b] -> [b, C, H, W] in [0, 1]
        _, h, w = self.cfg.input_shape
        x = self.fc(torch.cat([z, self.embed(y)], 1)).view(len(z), 2 * self.cfg.width, h // 4, w // 4)
        x = F.relu(self.bn0(x, y))
        x = F.relu(self.bn1(self.up1(x), y))  # [b, w, H/2, W/2]
        x = F.relu(self.bn2(self.up2(x), y))  # [b, w, H, W]
        return torch.sigmoid(self.out(x))


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        c = cfg.input_shape[0]
        feat = 4 * cfg.width
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(c, cfg.width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(cfg.width, 2 * cfg.width, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * cfg.width, feat, 3, 1, 1)), nn.LeakyReLU(0.2),
        )
        self.out = spectral_norm(nn.Linear(feat, 1))
        self.embed = spectral_norm(nn.Embedding(cfg.num_classes, feat))
        self.classify = nn.Linear(feat, cfg.num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [b, C, H, W], y: [b] -> scores [b] (higher = real), class logits [b, K]
        phi = self.body(x).sum((2, 3))  # [b, feat]
        return self.out(phi).squeeze(1) + (self.embed(y) * phi).sum(1), self.classify(phi)


def diff_augment(x: torch.Tensor, gen: torch.Generator, *, shift: float = 0.125, cutout: float = 0.5) -> torch.Tensor:
    """Random translation (zero-padded, up to ``shift`` of the side) and one square cutout
    (``cutout`` of the side) per image; differentiable in ``x``."""
    b, ch, h, w = x.shape
    p = max(1, int(h * shift))
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    rows, cols = dy[:, None] + torch.arange(h), dx[:, None] + torch.arange(w)  # [b, h], [b, w]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(ch)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]  # [b, C, h, w]
    s = max(1, int(h * cutout))
    cy, cx = torch.randint(0, h, (b,), generator=gen), torch.randint(0, w, (b,), generator=gen)
    yy, xx = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    keep = ~(((yy - cy[:, None, None]).abs() < s // 2) & ((xx - cx[:, None, None]).abs() < s // 2))  # [b, h, w]
    return out * keep[:, None].to(x.dtype)


def _check(data: Split, cfg: GANConfig) -> None:
    if len(data) < 2:
        raise ConfigError("a GAN needs at least two training images", got=len(data), fix="train on more of the split (--fraction)")
    if data.input_shape != cfg.input_shape or data.num_classes != cfg.num_classes:
        raise ConfigError("the GAN config does not match the data", got={"data": (data.input_shape, data.num_classes), "config": (cfg.input_shape, cfg.num_classes)},
                          fix="build the config from the split: GANConfig(input_shape=split.input_shape, num_classes=split.num_classes)")


def train_cgan(data: Split, cfg: GANConfig, *, log_every: int = 500) -> Generator:
    """Train on ``data`` (images in [0, 1]); returns the (averaged) generator in eval mode."""
    _check(data, cfg)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    g, d = Generator(cfg), Discriminator(cfg)
    g_avg = copy.deepcopy(g).requires_grad_(False)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=(0.0, 0.9))
    aug = (lambda x: diff_augment(x, gen)) if cfg.diffaug else (lambda x: x)  # noqa: E731
    bs = min(cfg.batch_size, len(data))
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(data), (bs,), generator=gen)
        real, labels = data.images[idx], data.labels[idx]  # [b, C, H, W], [b]
        h = bs // 2
        y = torch.cat([labels[:h], labels[:h], labels[2 * h :]])  # fake labels: fakes i and h + i share one, the mode-seeking pairs
        z = torch.randn(bs, cfg.latent, generator=gen)
        fake = g(z, y)
        s_real, c_real = d(aug(real), labels)
        s_fake, _ = d(aug(fake.detach()), y)
        loss_d = F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean() + cfg.ac_weight * F.cross_entropy(c_real, labels)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        s_g, c_g = d(aug(fake), y)
        loss_g = -s_g.mean() + cfg.ac_weight * F.cross_entropy(c_g, y)
        if cfg.mode_seeking and h:
            ratio = (fake[:h] - fake[h : 2 * h]).abs().mean() / (z[:h] - z[h : 2 * h]).abs().mean()
            loss_g = loss_g + cfg.mode_seeking / (ratio + 1e-5)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        _update_average(g_avg, g, min(cfg.ema, (1 + step) / (10 + step)))  # warm-up: a short run is not averaged with its init
        if log_every and (step + 1) % log_every == 0:
            el = time.perf_counter() - t0
            log.info("GAN step %d/%d  loss D %.3f  G %.3f  [%.0fs, eta %.0fs]", step + 1, cfg.steps, loss_d.item(), loss_g.item(), el, el / (step + 1) * (cfg.steps - step - 1))
    return g_avg.eval()


@torch.no_grad()
def _update_average(avg: nn.Module, live: nn.Module, decay: float) -> None:
    for a, p in zip(avg.parameters(), live.parameters(), strict=True):
        a.lerp_(p, 1 - decay)
    for a, b in zip(avg.buffers(), live.buffers(), strict=True):  # batch-norm statistics: the live ones
        a.copy_(b)


@torch.no_grad()
def sample(g: Generator, n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ([n, C, H, W] in [0, 1]) with labels cycling over the classes (balanced)."""
    gen = torch.Generator().manual_seed(seed)
    g.eval()
    y = torch.arange(n) % g.cfg.num_classes
    z = torch.randn(n, g.cfg.latent, generator=gen)
    if n == 0:
        return torch.zeros(0, *g.cfg.input_shape), y
    return torch.cat([g(z[i : i + 512], y[i : i + 512]) for i in range(0, n, 512)]), y


def save_grid(g: Generator, path: str | Path, *, per_class: int = 10, seed: int = 0) -> str:
    """A PNG grid: one row per class, ``per_class`` samples each."""
    from torchvision.utils import save_image

    k = g.cfg.num_classes
    x, y = sample(g, k * per_class, seed=seed)
    order = torch.argsort(y, stable=True)  # rows by class
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x[order], str(path), nrow=per_class, padding=2, pad_value=1.0)
    return str(path)


@torch.no_grad()
def label_accuracy(classify: Callable[[torch.Tensor], torch.Tensor], g: Generator, n: int, *, seed: int = 0) -> float:
    """The quality check: the share of ``n`` balanced samples of ``g`` that ``classify`` (images
    -> logits, e.g. a model trained on the real data) labels as the class they were drawn for."""
    if n < 1:
        raise ConfigError("the quality check needs samples", got=n, fix="e.g. --check-samples 1000")
    x, y = sample(g, n, seed=seed)
    pred = torch.cat([classify(x[i : i + 512]).argmax(1) for i in range(0, n, 512)])
    return float((pred == y).float().mean())


def synthetic_split(g: Generator, n: int, *, dataset: str, seed: int = 0) -> Split:
    """``n`` samples of ``g`` (balanced over the classes) as a training split of ``dataset``."""
    x, y = sample(g, n, seed=seed)
    return Split(name=dataset, split="train", images=x.float().contiguous(), labels=y.long(), num_classes=g.cfg.num_classes)


def gan_name(dataset: str) -> str:
    """The registry name of a dataset's generator: ``cgan-DATASET``."""
    return f"{GAN_KIND}-{dataset}"


def save_generator(registry: ModelRegistry, name: str, g: Generator, *, dataset: str, extra: dict | None = None) -> ModelInfo:
    """Register ``g``'s weights with its config (next version of ``name``)."""
    meta = {"kind": GAN_KIND, "dataset": dataset, "gan_config": {**dataclasses.asdict(g.cfg), "input_shape": list(g.cfg.input_shape)}, **(extra or {})}
    return registry.register(name, {k: v.detach().cpu().contiguous() for k, v in g.state_dict().items()}, meta)


def load_generator(registry: RegistryReader, ref: str) -> tuple[Generator, ModelInfo]:
    """Load and verify a registered generator (eval mode)."""
    loaded = registry.load(ref)
    meta = loaded.info.meta
    if meta.get("kind") != GAN_KIND:
        raise IntegrityError("registry entry is not a cGAN generator", got=loaded.info.ref, fix="pick one registered by `dynray gan` (cgan-DATASET)")
    cfg = GANConfig(**{**meta["gan_config"], "input_shape": tuple(meta["gan_config"]["input_shape"])})
    g = Generator(cfg)
    try:
        g.load_state_dict(loaded.tensors)
    except RuntimeError as e:
        raise IntegrityError("stored generator weights do not match the stored config", got=str(e)[:200], fix="re-train it with `dynray gan`") from e
    return g.eval(), loaded.info
