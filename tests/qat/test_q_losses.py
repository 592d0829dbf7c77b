"""Q's losses at their known extremes."""

from __future__ import annotations

import math

import pytest
import torch

from dfq_search.qat.losses import QLossParams, dkd_loss, entropy_loss, kd_loss, q_objective

GEN = torch.Generator().manual_seed(0)
Z_P = 3 * torch.randn(16, 10, generator=GEN)
Y = torch.randint(10, (16,), generator=GEN)
P = QLossParams()


def test_entropy_minimum_at_agreement_up_to_a_shift() -> None:
    best = entropy_loss(Z_P, Z_P + 2.5, Y, P)
    assert math.isclose(best.item(), -(20.0**2) * math.log(10), rel_tol=1e-5)
    assert entropy_loss(Z_P, 5 * torch.randn(16, 10, generator=GEN), Y, P) > best


@pytest.mark.parametrize("loss", [kd_loss, dkd_loss])
def test_distillation_zero_for_equal_logits(loss) -> None:
    assert abs(loss(Z_P, Z_P.clone(), Y, P).item()) < 1e-5
    other = Z_P + torch.randn(16, 10, generator=GEN)
    assert loss(Z_P, other, Y, P).item() > 1e-3


def test_dkd_parts_weighted() -> None:
    other = Z_P + torch.randn(16, 10, generator=GEN)
    tckd = dkd_loss(Z_P, other, Y, QLossParams(dkd_alpha=1.0, dkd_beta=0.0))
    nckd = dkd_loss(Z_P, other, Y, QLossParams(dkd_alpha=0.0, dkd_beta=1.0))
    both = dkd_loss(Z_P, other, Y, QLossParams(dkd_alpha=2.0, dkd_beta=3.0))
    torch.testing.assert_close(both, 2 * tckd + 3 * nckd)


def test_q_objective_detaches_p() -> None:
    z_p = Z_P.clone().requires_grad_()
    z_q = (Z_P + 1).requires_grad_()
    loss, terms = q_objective({"kd": 1.0, "ce": 0.5}, z_p, z_q, Y, P)
    loss.backward()
    assert z_p.grad is None and z_q.grad is not None and set(terms) == {"kd", "ce"}
