"""AdaRound: initial rounding, annealing, regulariser, and the hard result on the original grid."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dfq_search.ptq.adaround import (
    AdaRoundWeightQuantizer,
    attach_adaround_,
    beta_at,
    finalize_adaround_,
    rectified_sigmoid,
)
from dfq_search.quant import QuantConfig, QuantConv2d
from dfq_search.quant.quantizers import qparams


def _layer(bits: int = 3) -> QuantConv2d:
    torch.manual_seed(0)
    return QuantConv2d.from_float(nn.Conv2d(4, 6, 3), bits, 8, QuantConfig("mse"), True)


def test_initial_h_is_the_fractional_part_and_soft_weight_is_w():
    layer = _layer()
    ada = AdaRoundWeightQuantizer(layer.weight_quant, layer.weight)
    scale, zp = qparams(ada.lo, ada.hi, 3)
    w = layer.weight.detach() / scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(ada.h(), w - w.floor(), atol=1e-5, rtol=0)
    grid = w + zp.view(-1, 1, 1, 1)
    inside = (grid >= 0) & (grid <= 7)  # not clipped by the 3-bit grid
    assert inside.float().mean() > 0.8
    soft = ada(layer.weight)
    torch.testing.assert_close(soft[inside], layer.weight.detach()[inside], atol=1e-5, rtol=0)


def test_hard_rounding_at_init_is_round_to_nearest():
    layer = _layer()
    rtn = layer.weight_quant.quantize(layer.weight)
    ada = attach_adaround_(layer)
    ada.soft = False
    assert (ada(layer.weight) - rtn).abs().max() < 1e-5


def test_annealing_schedule():
    total, warm = 100, 0.2
    betas = [beta_at(s, total, 20.0, 2.0, warm) for s in range(total)]
    assert all(b is None for b in betas[:20]) and betas[20] == pytest.approx(20.0)
    assert betas[-1] == pytest.approx(2.0)
    assert all(a > b for a, b in itertools.pairwise(betas[20:]))
    assert beta_at(60, 100, 20.0, 2.0, 0.2) == pytest.approx(2.0 + 18.0 * (1 - 40 / 79))


def test_regulariser_zero_at_binary_h_and_largest_at_half():
    layer = _layer()
    ada = attach_adaround_(layer)
    with torch.no_grad():
        ada.v.fill_(10.0)  # h = 1
    assert float(ada.regularizer(2.0).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        ada.v.zero_()  # h = 0.5
    assert float(rectified_sigmoid(torch.zeros(()))) == pytest.approx(0.5)
    assert float(ada.regularizer(2.0).detach()) == pytest.approx(ada.v.numel())
    assert float(ada.regularizer(20.0).detach()) == pytest.approx(ada.v.numel())


def test_finalize_writes_a_grid_weight_and_restores_the_plain_quantizer():
    layer = _layer()
    keys = set(layer.state_dict())
    ada = attach_adaround_(layer)
    with torch.no_grad():
        ada.v.copy_(torch.randn_like(ada.v))  # some rounding away from nearest
    ada.soft = False
    hard = ada(layer.weight).detach().clone()
    finalize_adaround_(layer)
    assert not isinstance(layer.weight_quant, AdaRoundWeightQuantizer)
    assert set(layer.state_dict()) == keys
    torch.testing.assert_close(layer.weight.detach(), hard)
    torch.testing.assert_close(layer.weight_quant.quantize(layer.weight), hard, atol=1e-6, rtol=0)
