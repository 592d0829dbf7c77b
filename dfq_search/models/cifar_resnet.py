"""The original CIFAR ResNet (He et al. 2016, section 4.2), as in akamaster/pytorch_resnet_cifar10.

Depth 6n + 2: a 3x3 stem conv with 16 channels, three stages of n BasicBlocks with 16/32/64
channels (the first block of stages 2 and 3 has stride 2), global average pooling and ``linear``.
Shortcuts are "option A": subsample by 2 in space and zero-pad the channels, so they carry no
parameters. Every ReLU is its own, non-inplace module so that quantizers and hooks can find each
activation and a hook never sees its tensor changed afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dfq_search.models.base import CIFAR_PREPROCESS, ModelBundle, seeded_build
from dfq_search.models.registry import register_model
from dfq_search.models.weights import load_weights

DEPTHS = (20, 32, 44, 56, 110)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: ``x[:, :, ::2, ::2]`` then ``pad`` zero channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        changes = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = OptionAShortcut(planes // 4) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``n`` blocks per stage."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # Kaiming normal init, as in the reference code
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def _depth_hint(state: Mapping[str, torch.Tensor]) -> str:
    """' (the file looks like cifar_resnetD)' from the number of blocks in stage 1, if any."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.", k))}
    if not blocks:
        return ""
    depth = 6 * (max(blocks) + 1) + 2
    return f" (the file looks like cifar_resnet{depth}: {max(blocks) + 1} blocks per stage)"


def build_cifar_resnet(
    depth: int, weights: Path | None = None, num_classes: int | None = None
) -> ModelBundle:
    """CIFAR ResNet-``depth``; random init (seed 0) when ``weights`` is None."""
    classes = num_classes or 10
    model = seeded_build(lambda: CifarResNet(depth, classes))
    name = f"cifar_resnet{depth}"
    if weights is not None:
        load_weights(model, weights, name=name, hint=_depth_hint)
    return ModelBundle(model.eval(), CIFAR_PREPROCESS, name, classes)


def _register(depth: int) -> None:
    @register_model(f"cifar_resnet{depth}")
    def factory(weights: Path | None, num_classes: int | None) -> ModelBundle:
        return build_cifar_resnet(depth, weights, num_classes)

    factory.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)."


for _depth in DEPTHS:
    _register(_depth)
