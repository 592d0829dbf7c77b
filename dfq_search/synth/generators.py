"""Sample sources: the GDFQ conditional generator, LRQ's long-range variant, and a learnable pixel bank.

Every source is an ``nn.Module`` with ``num_classes``, ``image_shape`` and
``sample(batch_size, gen, device) -> (x [B, C, H, W], y int64 [B])``: the noise and labels are drawn on
CPU from the ``torch.Generator`` ``gen`` (so a seed gives the same samples on every device), and ``x``
is differentiable with respect to the source's parameters. :mod:`dfq_search.synth.conformance` checks
that contract.

GDFQ generator (ALGORITHMS.md §2), for an S x S image and ``u`` up-sampling stages (CIFAR: u = 2):

    h = Embedding(C, d)(y) ⊙ z,  z ~ N(0, I_d)          (or z alone with class-conditional BN)
    h = BN(Linear(d → 128·(S/2^u)²)(h))  reshaped to [128, S/2^u, S/2^u]
    u times: ×2 nearest up → Conv3×3 → BN(eps 0.8) → LeakyReLU(0.2)   (128 channels, 64 in the last)
    x = BN_affine=False(tanh(Conv3×3(64 → C)))

LRQ adds VAN large-kernel attention blocks ``out = x ⊙ Conv1×1(DWConv_{k2, dilation}(DWConv_{k1}(x)))``
after the stages listed in ``lka_after`` (0 = the initial feature map, i = after up-sampling stage i).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfq_search.errors import DfqError, unknown_name


class ConditionalBN(nn.Module):
    """BatchNorm without affine, then a per-class scale and shift (GDFQ's ImageNet generator)."""

    def __init__(self, channels: int, num_classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, affine=False)
        self.gamma = nn.Embedding(num_classes, channels)
        self.beta = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bn(x) * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class LargeKernelAttention(nn.Module):
    """VAN's LKA: ``x ⊙ Conv1×1(DWConv_{k2, d}(DWConv_{k1}(x)))``; k1, k2 odd."""

    def __init__(self, channels: int, k1: int = 5, k2: int = 7, dilation: int = 3) -> None:
        super().__init__()
        self.local = nn.Conv2d(channels, channels, k1, padding=k1 // 2, groups=channels)
        pad = dilation * (k2 // 2)
        self.wide = nn.Conv2d(channels, channels, k2, padding=pad, dilation=dilation, groups=channels)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mix(self.wide(self.local(x)))


class GDFQGenerator(nn.Module):
    """The GDFQ conditional generator (module docstring); ``lka_after`` makes it LRQ's generator."""

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        latent_dim: int = 100,
        upsamples: int = 2,
        conditional_bn: bool = False,
        lka_after: tuple[int, ...] = (),
        lka_kernels: tuple[int, int] = (5, 7),
        lka_dilation: int = 3,
    ) -> None:
        super().__init__()
        _check_shape(image_shape, upsamples, lka_after, lka_kernels)
        self.num_classes, self.image_shape, self.latent_dim = num_classes, tuple(image_shape), latent_dim
        self.init_size = image_shape[1] // 2**upsamples
        self.conditional_bn = conditional_bn
        self.embed = None if conditional_bn else nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, 128 * self.init_size**2)
        widths = [128] * upsamples + [64]
        self.bn0 = ConditionalBN(128, num_classes) if conditional_bn else nn.BatchNorm2d(128)
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1) for i in range(upsamples))
        self.bns = nn.ModuleList(
            ConditionalBN(w, num_classes, 0.8) if conditional_bn else nn.BatchNorm2d(w, eps=0.8)
            for w in widths[1:]
        )
        self.lka = nn.ModuleDict(
            {str(i): LargeKernelAttention(widths[i], *lka_kernels, lka_dilation) for i in lka_after}
        )
        self.act = nn.LeakyReLU(0.2)
        self.to_image = nn.Conv2d(64, image_shape[0], 3, 1, 1)
        self.out_bn = nn.BatchNorm2d(image_shape[0], affine=False)

    def _norm(self, bn: nn.Module, h: Tensor, y: Tensor) -> Tensor:
        return bn(h, y) if self.conditional_bn else bn(h)

    def _attend(self, stage: int, h: Tensor) -> Tensor:
        key = str(stage)
        return self.lka[key](h) if key in self.lka else h

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = z if self.embed is None else self.embed(y) * z
        h = self.fc(h).view(-1, 128, self.init_size, self.init_size)
        h = self._attend(0, self._norm(self.bn0, h, y))
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True), start=1):
            h = conv(nn.functional.interpolate(h, scale_factor=2, mode="nearest"))
            h = self._attend(i, self.act(self._norm(bn, h, y)))
        return self.out_bn(torch.tanh(self.to_image(h)))

    def sample(
        self, batch_size: int, gen: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` samples and their labels; z and y drawn from ``gen`` on CPU."""
        z = torch.randn(batch_size, self.latent_dim, generator=gen)
        y = torch.randint(self.num_classes, (batch_size,), generator=gen)
        z, y = z.to(device), y.to(device)
        return self(z, y), y


class PixelBank(nn.Module):
    """``n`` learnable images and fixed random labels: direct image optimisation as a sample source.

    ``sample`` returns a random subset (drawn from ``gen``); the gradient reaches those pixels only.
    """

    def __init__(self, num_classes: int, image_shape: tuple[int, int, int], n: int = 256, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_classes, self.image_shape = num_classes, tuple(image_shape)
        self.pixels = nn.Parameter(torch.randn(n, *image_shape, generator=gen))
        self.register_buffer("labels", torch.randint(num_classes, (n,), generator=gen))

    def sample(
        self, batch_size: int, gen: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.labels), (batch_size,), generator=gen).to(self.pixels.device)
        return self.pixels[idx].to(device), self.labels[idx].to(device)


SOURCES = {"gdfq": GDFQGenerator, "lrq": GDFQGenerator, "pixels": PixelBank}
LRQ_DEFAULTS = {"lka_after": (1, 2)}


def build_source(
    name: str, num_classes: int, image_shape: tuple[int, int, int], seed: int = 0, **kwargs
) -> nn.Module:
    """A sample source by name ("gdfq", "lrq", "pixels"), its weights initialised under ``seed``."""
    if name not in SOURCES:
        raise unknown_name("sample source", name, SOURCES, "pick one of the listed sources")
    if name == "lrq":
        kwargs = {**LRQ_DEFAULTS, **kwargs}
    if name == "pixels":
        return PixelBank(num_classes, image_shape, seed=seed, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SOURCES[name](num_classes, image_shape, **kwargs)


def _check_shape(shape: tuple[int, ...], upsamples: int, lka_after: tuple[int, ...], kernels) -> None:
    _, h, w = shape
    if h != w or h % 2**upsamples or h < 2**upsamples:
        raise DfqError(
            "generator image shape", shape, f"square, the side a multiple of 2^upsamples = {2**upsamples}",
            "pick upsamples so that the side divides (CIFAR 32: 2; ImageNet 224: 5)",
        )  # fmt: skip
    bad = [i for i in lka_after if not 0 <= i <= upsamples]
    if bad:
        raise DfqError("lka_after", lka_after, f"stage indices in 0..{upsamples}", "drop the others")
    if any(k % 2 == 0 or k < 1 for k in kernels):
        raise DfqError("lka_kernels", kernels, "two odd positive sizes", "pass e.g. (5, 7)")
