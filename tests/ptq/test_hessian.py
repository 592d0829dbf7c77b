"""HAWQ-V3's data-free sensitivity: Hutchinson's trace of the self-KL Hessian, and Ω from it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfq_search.errors import DfqError
from dfq_search.ptq.hessian import hawq_sensitivity, hessian_traces


def _small() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)]
    return nn.Sequential(*layers).eval()


def _exact_trace(model: nn.Module, x: torch.Tensor, name: str) -> float:
    """Tr of the Hessian of the self-KL with respect to one layer's weight, by the full Hessian."""
    layer = model.get_submodule(name)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        target = F.log_softmax(model(x), 1)

    def loss(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {f"{name}.weight": w}, (x,))
        return F.kl_div(F.log_softmax(out, 1), target, log_target=True, reduction="batchmean")

    h = torch.autograd.functional.hessian(loss, w0)
    return float(h.reshape(w0.numel(), w0.numel()).diagonal().sum())


def test_hutchinson_matches_the_exact_trace_of_every_layer():
    model = _small()
    x = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    got = hessian_traces(model, [x], probes=600, seed=0)
    assert set(got) == {"0", "4"}
    for name in got:
        exact = _exact_trace(model, x, name) / model.get_submodule(name).weight.numel()
        assert exact > 0
        assert got[name] == pytest.approx(exact, rel=0.2), name  # Monte Carlo: 600 Rademacher probes


def test_the_model_is_left_untouched_and_omega_falls_with_the_bits():
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    traces = hessian_traces(model, [x, x.flip(0)], probes=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    omega = hawq_sensitivity(model, traces, (2, 3, 4, 8))
    for name, by_bits in omega.items():
        assert by_bits[2] > by_bits[3] > by_bits[4] > by_bits[8] >= 0, (name, by_bits)


def test_a_layer_that_matters_more_has_the_larger_trace():
    """Scaling the head's output up makes the KL more curved in every weight: the traces grow."""
    model = _small()
    x = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    base = hessian_traces(model, [x], probes=16)
    with torch.no_grad():
        model[4].weight.mul_(3.0)
    sharper = hessian_traces(model, [x], probes=16)
    assert sharper["0"] > base["0"]


def test_probes_are_checked():
    with pytest.raises(DfqError, match="probes"):
        hessian_traces(_small(), [torch.zeros(1, 2, 4, 4)], probes=0)
