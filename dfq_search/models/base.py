"""What every model comes with: its input preprocessing and a bundle of model + metadata."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dfq_search.errors import DfqError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs.

    An image is decoded to ``channels`` channels, its shorter side resized to ``resize`` (to
    ``input_size`` when ``resize`` is None, a no-op for images already that size), center-cropped to
    ``input_size`` x ``input_size`` and stored as uint8. ``normalize`` then maps a uint8 batch ``u``
    to ``(u / 255 - mean) / std`` per channel, the same as torchvision's ``ToTensor`` + ``Normalize``.
    """

    input_size: int
    resize: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    def __post_init__(self) -> None:
        # Accept lists (from YAML or the CLI) but store tuples, so the dataclass stays hashable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not isinstance(self.input_size, int) or self.input_size < 1:
            raise DfqError("bad input_size", self.input_size, "a positive int", "pass e.g. 32")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < 1):
            raise DfqError("bad resize", self.resize, "None or a positive int", "pass e.g. 256 or None")
        if self.resize is not None and self.resize < self.input_size:
            raise DfqError(
                "resize is smaller than input_size",
                (self.resize, self.input_size),
                "resize >= input_size, since the crop is taken from the resized image",
                "raise resize or pass resize=None",
            )
        if self.channels not in (1, 3):
            raise DfqError("bad channels", self.channels, "1 or 3", "pass channels=1 or 3")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DfqError(
                "mean/std length does not match channels",
                (self.mean, self.std, self.channels),
                "one mean and one std per channel",
                f"give {self.channels} value(s) for each",
            )
        if any(s <= 0 for s in self.std):
            raise DfqError("bad std", self.std, "all std > 0", "pass positive std values")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The input shape of one image, (C, H, W)."""
        return (self.channels, self.input_size, self.input_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map a uint8 batch [N, C, H, W] to the float input of the model (on x's device)."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != self.channels:
            raise DfqError(
                "normalize expects a uint8 [N, C, H, W] batch",
                (str(x.dtype), tuple(x.shape)),
                f"dtype uint8 with C = {self.channels}",
                "pass images decoded by dfq_search.data for this model's preprocess",
            )
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        # One fused multiply-add: x * (1 / (255 std)) - mean / std.
        return torch.addcmul((-mean / std), x.float(), 1.0 / (255.0 * std))

    def example_input(self, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        """Zeros of the model's input shape, e.g. for tracing or shape checks."""
        return torch.zeros(batch, *self.shape, device=device)


IMAGENET_PREPROCESS = Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, 3)
CIFAR_PREPROCESS = Preprocess(32, None, IMAGENET_MEAN, IMAGENET_STD, 3)


@dataclass
class ModelBundle:
    """A model in eval mode with what is needed to feed it and to name it."""

    model: nn.Module
    preprocess: Preprocess
    name: str
    num_classes: int


def seeded_build(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` under a fixed seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
