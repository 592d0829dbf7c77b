"""Tiny BatchNorm models for tests: each under 20k parameters, 16x16 RGB input, seeded init.

* ``tiny_cnn``: a plain conv-BN-ReLU stack and a linear head;
* ``tiny_resnet``: two residual blocks, one with an identity shortcut and one that downsamples
  with a 1x1 conv + BN shortcut;
* ``tiny_mobilenet``: inverted residuals (1x1 expand, 3x3 depthwise, ReLU6, linear 1x1 bottleneck),
  one with a residual add.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dfq_search.models.base import IMAGENET_MEAN, IMAGENET_STD, ModelBundle, Preprocess, seeded_build
from dfq_search.models.registry import register_model
from dfq_search.models.weights import load_weights

TINY_PREPROCESS = Preprocess(16, None, IMAGENET_MEAN, IMAGENET_STD, 3)


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU
) -> nn.Sequential:
    """Conv (no bias) + BN (+ activation unless ``act`` is None)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def head(cin: int, num_classes: int) -> nn.Sequential:
    """Global average pool, flatten, linear."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


class TinyCNN(nn.Module):
    """16x16 -> conv 8 -> conv 16 /2 -> conv 32 /2 -> pool -> linear (about 6k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), conv_bn(8, 16, stride=2), conv_bn(16, 32, stride=2))
        self.head = head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResidualBlock(nn.Module):
    """relu(conv-bn-relu-conv-bn(x) + shortcut(x)); a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride=stride), conv_bn(cout, cout, act=None))
        changes = stride != 1 or cin != cout
        self.shortcut = conv_bn(cin, cout, k=1, stride=stride, act=None) if changes else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem 16, an identity block (16), a downsampling block (24, stride 2), linear (~14k params)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block1 = ResidualBlock(16, 16)
        self.block2 = ResidualBlock(16, 24, stride=2)
        self.head = head(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            conv_bn(cin, hidden, k=1, act=nn.ReLU6),
            conv_bn(hidden, hidden, stride=stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, k=1, act=None),  # linear bottleneck: no activation
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class TinyMobileNet(nn.Module):
    """Stem 16, IR 16 (residual), IR 24 /2, 1x1 conv 64 + ReLU6, linear (~9k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, act=nn.ReLU6)
        self.blocks = nn.Sequential(InvertedResidual(16, 16), InvertedResidual(16, 24, stride=2))
        self.last = conv_bn(24, 64, k=1, act=nn.ReLU6)
        self.head = head(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.blocks(self.stem(x))))


def _register(name: str, cls: Callable[[int], nn.Module]) -> None:
    @register_model(name)
    def factory(weights: Path | None, num_classes: int | None) -> ModelBundle:
        classes = num_classes or 10
        model = seeded_build(lambda: cls(classes))
        if weights is not None:
            load_weights(model, weights, name=name)
        return ModelBundle(model.eval(), TINY_PREPROCESS, name, classes)

    factory.__doc__ = f"{cls.__doc__} Random init with seed 0 unless weights are given."


_register("tiny_cnn", TinyCNN)
_register("tiny_resnet", TinyResNet)
_register("tiny_mobilenet", TinyMobileNet)
