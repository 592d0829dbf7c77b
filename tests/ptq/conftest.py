"""Tiny models and calibration batches shared by the ptq tests, and tiny members of each model family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dfq_search.data import gaussian_batches
from dfq_search.models import create_model
from dfq_search.models.tiny import conv_bn
from dfq_search.models.tiny import head as tiny_head
from dfq_search.quant import PROTOCOLS, LayerBits, trace_layers


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny_resnet")


@pytest.fixture(scope="module")
def batches(tiny):
    return list(gaussian_batches(tiny.preprocess, 4, 32, 0))


@pytest.fixture(scope="module")
def ptq_plan():
    """``ptq_plan(bundle, w, a)``: the PTQ protocol's plan (8-bit first and last layer) at WwAa."""

    def make(bundle, w: int, a: int):
        layers = trace_layers(bundle.model, bundle.preprocess.example_input())
        return PROTOCOLS["ptq"].plan(layers, LayerBits(w, a))

    return make


# Tiny members of each model family, for unit discovery and ModCap (16x16 inputs, random init).


def _separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    """Depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN + ReLU6 (MobileNetV1's block), unwrapped."""
    return [
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
    ]  # fmt: skip


class GrayNet(nn.Module):
    """A 1-channel net written with attributes and its own forward (conv-BN-ReLU, max-pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


class SqueezeExcite(nn.Module):
    """x * sigmoid(conv(silu(conv(mean(x))))): channel gates."""

    def __init__(self, c: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce, self.act, self.expand = nn.Conv2d(c, squeezed, 1), nn.SiLU(), nn.Conv2d(squeezed, c, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand + SiLU, depthwise 3x3 + SiLU, SE, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        hidden = 4 * cin
        self.expand = conv_bn(cin, hidden, k=1, act=nn.SiLU)
        self.dw = conv_bn(hidden, hidden, stride=stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcite(hidden, max(1, cin // 4))
        self.project = conv_bn(hidden, cout, k=1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.residual else out


def _vgg() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip


def _mobilenet_v1() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        *_separable(8, 16, 1), *_separable(16, 32, 2), *_separable(32, 32, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def _efficientnet() -> nn.Module:
    return nn.Sequential(
        conv_bn(3, 16, act=nn.SiLU), MBConv(16, 16), MBConv(16, 24, 2), MBConv(24, 24),
        conv_bn(24, 64, k=1, act=nn.SiLU), tiny_head(64, 10),
    )  # fmt: skip


FAMILIES: dict[str, tuple[Callable[[], nn.Module], int]] = {  # builder, input channels
    "vgg": (_vgg, 3),
    "mobilenet_v1": (_mobilenet_v1, 3),
    "gray": (GrayNet, 1),
    "efficientnet": (_efficientnet, 3),
    "tiny_cnn": (lambda: create_model("tiny_cnn").model, 3),
    "tiny_resnet": (lambda: create_model("tiny_resnet").model, 3),
    "tiny_mobilenet": (lambda: create_model("tiny_mobilenet").model, 3),
}


@dataclass
class Family:
    name: str
    model: nn.Module
    batches: list[torch.Tensor]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> Family:
    """One tiny model of each family, in eval mode, with two batches of Gaussian noise."""
    build, channels = FAMILIES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # BN statistics away from (0, 1), so BN is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, channels, 16, 16, generator=gen) for _ in range(2)]
    return Family(request.param, model, batches)
