"""Conv2d/Linear subclasses with their own forward, as timm and EfficientNet-PyTorch write them, and a
tiny BN CNN built from them (named ``dfq_subclass_helper:build`` as a user model)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding that makes the output ceil(size / stride) long (TensorFlow's "SAME")."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dStaticSame(nn.Conv2d):
    """EfficientNet-PyTorch's ``Conv2dStaticSamePadding``: "same" padding fixed for ``image_size``, put
    by a ``ZeroPad2d`` child (asymmetric for even totals: one more row/column at the end)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, image_size: int, **kw) -> None:
        super().__init__(cin, cout, kernel, stride, **kw)
        pad = _same_pad(image_size, self.kernel_size[0], self.stride[0], self.dilation[0])
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: "same" padding computed from the input's size in the forward."""

    def forward(self, x: Tensor) -> Tensor:
        (ih, iw), (kh, kw) = x.shape[-2:], self.weight.shape[-2:]
        ph = _same_pad(ih, kh, self.stride[0], self.dilation[0])
        pw = _same_pad(iw, kw, self.stride[1], self.dilation[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d``: the weight standardised per output channel before every convolution."""

    def __init__(self, *args, eps: float = 1e-6, **kw) -> None:
        super().__init__(*args, **kw)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - mean) / torch.sqrt(var + self.eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class CosineLinear(nn.Linear):
    """A cosine classifier: logits are ``scale`` times the cosine between input and weight rows."""

    def __init__(self, cin: int, cout: int, scale: float = 16.0) -> None:
        super().__init__(cin, cout, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class NoWeightConv(nn.Conv2d):
    """A subclass whose forward never reads ``self.weight`` (it convolves with a kernel of its own)."""

    def __init__(self, cin: int, cout: int, kernel: int, **kw) -> None:
        super().__init__(cin, cout, kernel, **kw)
        self.kernel = nn.Parameter(self.weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernel, self.bias, self.stride, self.padding)


def _bn_relu(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


class SubclassNet(nn.Module):
    """16x16x3 -> static-same conv /2 -> dynamic-same conv /2 -> standardised conv -> pool -> cosine."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _bn_relu(Conv2dStaticSame(3, 8, 3, 2, image_size=16, bias=False))
        self.block = _bn_relu(Conv2dSame(8, 16, 3, 2, bias=False))
        self.std = _bn_relu(StdConv2d(16, 16, 3, padding=1, bias=False))
        self.pw = _bn_relu(nn.Conv2d(16, 16, 1, bias=False))  # a plain one beside them
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = CosineLinear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.pw(self.std(self.block(self.stem(x))))).flatten(1))


def build(num_classes: int = 10) -> nn.Module:
    return SubclassNet(num_classes)
