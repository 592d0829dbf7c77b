"""Tiny BN models: shapes, BatchNorm present, deterministic creation, small and cheap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfq_search.models import create_model
from dfq_search.quant import trace_layers

TINY = ("tiny_cnn", "tiny_resnet", "tiny_mobilenet")


@pytest.mark.parametrize("name", TINY)
def test_forward_shape_size_and_cost(name):
    bundle = create_model(name)
    assert bundle.preprocess.shape == (3, 16, 16)
    assert sum(p.numel() for p in bundle.model.parameters()) < 20_000
    x = torch.randn(8, 3, 16, 16)
    with torch.inference_mode():
        out = bundle.model(x)
    # fast by construction, on any machine and under any load: under 2M multiply-adds per image
    assert out.shape == (8, 10) and sum(i.macs for i in trace_layers(bundle.model, x[:1])) < 2_000_000
    assert create_model(name, num_classes=4).model(x).shape == (8, 4)


@pytest.mark.parametrize("name", TINY)
def test_batchnorm_present(name):
    model = create_model(name).model
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(convs) >= 3  # every conv is followed by a BN


@pytest.mark.parametrize("name", TINY)
def test_creation_is_deterministic_and_leaves_the_global_rng_alone(name):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = create_model(name).model.state_dict()
    assert torch.equal(torch.rand(1), expected)
    b = create_model(name).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_block_kinds():
    from dfq_search.models.tiny import InvertedResidual, ResidualBlock

    resnet = create_model("tiny_resnet").model
    shortcuts = [type(b.shortcut) for b in resnet.modules() if isinstance(b, ResidualBlock)]
    assert shortcuts == [nn.Identity, nn.Sequential]
    mobile = create_model("tiny_mobilenet").model
    blocks = [b for b in mobile.modules() if isinstance(b, InvertedResidual)]
    assert [b.residual for b in blocks] == [True, False]
    depthwise = blocks[0].body[1][0]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels
    assert isinstance(blocks[0].body[1][2], nn.ReLU6) and len(blocks[0].body[2]) == 2  # linear
