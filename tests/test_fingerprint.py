"""Model fingerprints: stable across what does not change the function, different when it does."""

from __future__ import annotations

import torch
from torch import nn

from dfq_search.fingerprint import architecture, model_fingerprint


class Scale(nn.Module):
    """A user's own module: its public settings are part of the architecture."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def net(stride: int = 1, factor: float = 2.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride), nn.BatchNorm2d(4), nn.ReLU(), Scale(factor))


def test_fingerprint_ignores_reprs_and_flags_that_do_not_change_the_function(monkeypatch):
    base = model_fingerprint(net())
    # a torch release that prints BatchNorm differently (2.14 added bias=True) or adds a flag
    monkeypatch.setattr(nn.BatchNorm2d, "extra_repr", lambda self: "something new")
    relu_inplace = net()
    relu_inplace[2].inplace = True
    relu_inplace[1].new_flag_of_a_later_torch = True
    assert model_fingerprint(net()) == base == model_fingerprint(relu_inplace)


def test_fingerprint_sees_settings_that_change_the_function():
    base = model_fingerprint(net())
    assert model_fingerprint(net(stride=2)) != base  # same state dict shapes, another function
    assert model_fingerprint(net(factor=3.0)) != base  # a user's module's own setting
    eps = net()
    eps[1].eps = 1e-3
    assert model_fingerprint(eps) != base
    assert "Conv2d(dilation=(1, 1), groups=1, kernel_size=(3, 3)" in architecture(net())
