"""A panel of architectures beyond the ResNets, each in a full and a tiny (test) size.

Full size (trained by ``benchmarks/zoo.py``, weights cached by ``dfq_search.models.zoo``):

* ``cifar_mobilenetv2``: MobileNetV2 for 32x32 (inverted residuals: 1x1 expand, 3x3 depthwise,
  ReLU6, linear 1x1 bottleneck, residual add when the shape is kept);
* ``cifar_vgg``: plain VGG, one flat ``nn.Sequential`` of conv-BN-ReLU and max-pooling as in
  torchvision's ``make_layers``, no residuals;
* ``cifar_effnet``: EfficientNet-style MBConv (SiLU, squeeze-and-excitation, 3x3 and 5x5 depthwise);
* ``mnist_dwnet``: 28x28 grayscale, depthwise-separable conv-BN-ReLU6 stacks, no residuals, written
  as a user would (a stem of attributes, blocks in a Sequential).

Tiny (16x16, under 20k parameters, for tests): ``tiny_vgg``, ``tiny_effnet``, ``tiny_gray_dwnet``;
the same classes with smaller configurations. CIFAR models take the CIFAR ResNet's preprocessing
(ImageNet mean/std at 32x32), the grayscale ones MNIST's pixel mean and std. Every model is built
under seed 0, so ``weights=None`` gives the same random init every time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dfq_search.models.base import CIFAR_PREPROCESS, ModelBundle, Preprocess, seeded_build
from dfq_search.models.registry import register_model
from dfq_search.models.tiny import TINY_PREPROCESS, conv_bn, head
from dfq_search.models.weights import load_weights

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # pixel mean and std of MNIST's training set
MNIST_PREPROCESS = Preprocess(28, None, MNIST_MEAN, MNIST_STD, channels=1)
TINY_GRAY_PREPROCESS = Preprocess(16, None, MNIST_MEAN, MNIST_STD, channels=1)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(silu(fc1(avgpool(x))))): channel gates from the pooled input (1x1 convs)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class InvertedBottleneck(nn.Module):
    """MobileNetV2's inverted residual, or with ``se`` and SiLU EfficientNet's MBConv.

    1x1 expand (skipped when ``expand`` is 1) + act, ``kernel`` x ``kernel`` depthwise + act,
    squeeze-and-excitation on a quarter of the input channels (``se``), 1x1 linear projection
    (no activation: the linear bottleneck); ``x + out`` when stride 1 keeps the channels.
    """

    def __init__(
        self, cin: int, cout: int, *, stride: int = 1, expand: int = 6, kernel: int = 3,
        act: type[nn.Module] = nn.ReLU6, se: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, k=1, act=act) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, k=kernel, stride=stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden, max(1, cin // 4)) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, k=1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


# (expand, kernel, channels, repeats, first stride) per stage.
Stage = tuple[int, int, int, int, int]


class BottleneckNet(nn.Module):
    """stem conv 3x3 + act, the stages of ``InvertedBottleneck``s, 1x1 conv + act, pool, linear."""

    def __init__(
        self, stem: int, stages: Sequence[Stage], last: int, num_classes: int = 10, *,
        act: type[nn.Module] = nn.ReLU6, se: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stem = conv_bn(3, stem, act=act)
        blocks: list[nn.Module] = []
        cin = stem
        for expand, kernel, cout, repeats, stride in stages:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(
                    InvertedBottleneck(cin, cout, stride=s, expand=expand, kernel=kernel, act=act, se=se)
                )
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn(cin, last, k=1, act=act)
        self.head = head(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.blocks(self.stem(x))))


# MobileNetV2 at about half width; 32 -> 16 -> 8 -> 4 (the stride-1 stem keeps CIFAR's detail).
MOBILENETV2_STAGES: tuple[Stage, ...] = (
    (1, 3, 16, 1, 1), (6, 3, 24, 2, 2), (6, 3, 32, 3, 2), (6, 3, 64, 3, 2), (6, 3, 96, 2, 1),
)  # fmt: skip
# EfficientNet-B0's pattern (3x3 and 5x5 depthwise, SE), fewer and narrower stages.
EFFNET_STAGES: tuple[Stage, ...] = (
    (1, 3, 16, 1, 1), (6, 3, 24, 2, 2), (6, 5, 40, 2, 2), (6, 3, 80, 2, 2), (6, 5, 96, 1, 1),
)  # fmt: skip
TINY_EFFNET_STAGES: tuple[Stage, ...] = ((1, 3, 8, 1, 1), (4, 3, 16, 1, 2), (4, 5, 16, 1, 1))


def make_vgg_layers(cfg: Sequence[int | str], in_channels: int = 3) -> nn.Sequential:
    """torchvision's ``make_layers(cfg, batch_norm=True)``: an int is conv 3x3-BN-ReLU, "M" max-pool."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` (a flat Sequential), then flatten and a linear ``classifier``."""

    def __init__(self, cfg: Sequence[int | str], input_size: int, num_classes: int = 10) -> None:
        super().__init__()
        self.features = make_vgg_layers(cfg)
        side = input_size // 2 ** cfg.count("M")
        channels = [v for v in cfg if v != "M"][-1]
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


VGG_CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M", 192, "M")  # 32 -> 2x2x192 -> linear
TINY_VGG_CFG = (8, "M", 16, "M", 24, "M")  # 16 -> 2x2x24 -> linear


def dw_separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 conv-BN-ReLU6, then pointwise 1x1 conv-BN-ReLU6 (MobileNetV1's block)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class GrayDWNet(nn.Module):
    """1-channel input: conv 3x3 stem, depthwise-separable blocks ((channels, stride) each), pool, fc."""

    def __init__(self, stem: int, blocks: Sequence[tuple[int, int]], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu1 = nn.ReLU6()
        layers, cin = [], stem
        for cout, stride in blocks:
            layers.append(dw_separable(cin, cout, stride))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


MNIST_DW_BLOCKS = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2))  # 28 -> 14 -> 7 -> 4
TINY_GRAY_DW_BLOCKS = ((16, 2), (32, 2), (48, 1))  # 16 -> 8 -> 4

# name -> (builder of num_classes, preprocess, one-line description)
PANEL: dict[str, tuple[Callable[[int], nn.Module], Preprocess, str]] = {
    "cifar_mobilenetv2": (
        lambda n: BottleneckNet(16, MOBILENETV2_STAGES, 320, n, act=nn.ReLU6),
        CIFAR_PREPROCESS,
        "MobileNetV2 for 32x32 CIFAR (inverted residuals, depthwise 3x3, ReLU6, linear bottleneck).",
    ),
    "cifar_vgg": (
        lambda n: VGG(VGG_CFG, 32, n),
        CIFAR_PREPROCESS,
        "Plain VGG for 32x32 CIFAR (a flat Sequential of conv-BN-ReLU and max-pool, no residuals).",
    ),
    "cifar_effnet": (
        lambda n: BottleneckNet(24, EFFNET_STAGES, 320, n, act=nn.SiLU, se=True),
        CIFAR_PREPROCESS,
        "EfficientNet-style for 32x32 CIFAR (MBConv: SiLU, squeeze-and-excitation, depthwise 3x3/5x5).",
    ),
    "mnist_dwnet": (
        lambda n: GrayDWNet(16, MNIST_DW_BLOCKS, n),
        MNIST_PREPROCESS,
        "28x28 grayscale depthwise-separable net (conv-BN-ReLU6 stacks, no residuals) for MNIST.",
    ),
    "tiny_vgg": (
        lambda n: VGG(TINY_VGG_CFG, 16, n),
        TINY_PREPROCESS,
        "Tiny plain VGG (flat Sequential, max-pool), 16x16 RGB, for tests.",
    ),
    "tiny_effnet": (
        lambda n: BottleneckNet(8, TINY_EFFNET_STAGES, 64, n, act=nn.SiLU, se=True),
        TINY_PREPROCESS,
        "Tiny EfficientNet-style net (MBConv with SiLU and SE), 16x16 RGB, for tests.",
    ),
    "tiny_gray_dwnet": (
        lambda n: GrayDWNet(8, TINY_GRAY_DW_BLOCKS, n),
        TINY_GRAY_PREPROCESS,
        "Tiny 1-channel depthwise-separable net (ReLU6, no residual), 16x16, for tests.",
    ),
}


def build_panel_model(name: str, weights: Path | None = None, num_classes: int | None = None) -> ModelBundle:
    """Panel model ``name``: random init under seed 0, then ``weights`` loaded strictly when given."""
    build, preprocess, _ = PANEL[name]
    classes = num_classes or 10
    model = seeded_build(lambda: build(classes))
    if weights is not None:
        load_weights(model, weights, name=name)
    return ModelBundle(model.eval(), preprocess, name, classes)


def _register(name: str) -> None:
    @register_model(name)
    def factory(weights: Path | None, num_classes: int | None) -> ModelBundle:
        return build_panel_model(name, weights, num_classes)

    factory.__doc__ = f"{PANEL[name][2]} Random init with seed 0 unless weights are given."


for _name in PANEL:
    _register(_name)
