"""Sample losses at their known extremes, and the shared-forward objective."""

from __future__ import annotations

import math

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.synth.losses import (
    SampleBatch,
    TermParams,
    normalized_disagreement,
    sci_loss,
    slack_from_noise,
)
from dfq_search.synth.objective import SampleObjective


def test_normalized_disagreement_in_unit_interval() -> None:
    gen = torch.Generator().manual_seed(0)
    z_p, z_q = torch.randn(32, 10, generator=gen) * 3, torch.randn(32, 10, generator=gen) * 3
    h = normalized_disagreement(z_p, z_q)
    assert h.min() == 0 and h.max() <= 1 and h.max() > 0.3
    same = normalized_disagreement(z_p, z_p + torch.randn(32, 1, generator=gen))  # equal up to a shift
    # all samples at the maximum entropy log C: the min is log C as well, so H' is 0/0 -> clamped 0
    assert torch.isfinite(same).all()


def test_margin_zero_inside_bounds_positive_outside(tiny) -> None:
    model, prep = tiny
    obj = SampleObjective(model, {"margin": 1.0}, TermParams(lambda_l=0.0, lambda_u=1.0))
    x, y = torch.randn(8, *prep.shape), torch.randint(10, (8,))
    q = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, 10))
    loss, metrics, _ = obj(x, y, q)
    assert loss.item() == 0.0 and metrics["margin"] == 0.0
    tight = SampleObjective(model, {"margin": 1.0}, TermParams(lambda_l=0.4, lambda_u=0.5))
    assert tight(x, y, q)[0].item() > 0.0


def test_sci_identical_samples_far_worse_than_noise() -> None:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(16, 3, 8, 8, generator=gen)
    same = noise[:1].expand(16, -1, -1, -1)
    dummy = torch.zeros(16, 10)

    def sci(x):
        return sci_loss(SampleBatch(x, torch.zeros(16, dtype=torch.long), dummy, None), TermParams()).item()

    assert sci(same) > 100 * sci(noise)
    x = same.clone().requires_grad_()
    sci_loss(SampleBatch(x, torch.zeros(16, dtype=torch.long), dummy, None), TermParams()).backward()
    assert torch.isfinite(x.grad).all()


def test_sda_zero_within_slack_and_slack_from_percentile(tiny) -> None:
    model, prep = tiny
    lo = slack_from_noise(model, prep.shape, eps=0.5)
    hi = slack_from_noise(model, prep.shape, eps=0.95)
    assert (hi["delta"] > lo["delta"]).all() and (hi["gamma"] > lo["gamma"]).all()
    huge = {"delta": torch.full_like(lo["delta"], 1e3), "gamma": torch.full_like(lo["gamma"], 1e3)}
    obj = SampleObjective(model, {"sda": 1.0, "lse": 1.0}, TermParams(slack=huge))
    loss, _metrics, _ = obj(torch.randn(8, *prep.shape), torch.randint(10, (8,)))
    assert loss.item() == 0.0
    plain = SampleObjective(model, {"sda": 1.0, "lse": 1.0}, input_shape=prep.shape)
    assert plain(torch.randn(8, *prep.shape) * 3, torch.randint(10, (8,)))[0].item() > 0


def test_ama_zero_margin_equals_scaled_cosine_ce(tiny) -> None:
    model, prep = tiny
    x, y = torch.randn(8, *prep.shape), torch.randint(10, (8,))
    base = SampleObjective(model, {"ama": 1.0}, TermParams(ama_margin=0.0, ama_scale=1.0))(x, y)[0]
    wide = SampleObjective(model, {"ama": 1.0}, TermParams(ama_margin=0.5, ama_scale=1.0))(x, y)[0]
    assert wide > base  # a margin on the target angle makes the target harder
    box = {}
    head = model.head[-1]
    h = head.register_forward_pre_hook(lambda m, i: box.setdefault("f", i[0]))
    model(x)
    h.remove()
    cos = torch.nn.functional.normalize(box["f"], dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    torch.testing.assert_close(base, torch.nn.functional.cross_entropy(cos, y))


def test_objective_runs_p_once_and_removes_hooks(tiny) -> None:
    model, prep = tiny
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    obj = SampleObjective(model, {"bns": 1.0, "ce": 1.0, "lse": 0.1, "sci": 1.0, "ama": 0.1},
                          input_shape=prep.shape)  # fmt: skip
    calls.clear()
    x = torch.randn(8, *prep.shape, requires_grad=True)
    loss, metrics, _z_p = obj(x, torch.randint(10, (8,)))
    h.remove()
    assert len(calls) == 1 and set(metrics) == {"bns", "ce", "lse", "sci", "ama"}
    expected = metrics["bns"] + metrics["ce"] + 0.1 * metrics["lse"] + metrics["sci"] + 0.1 * metrics["ama"]
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize(
    ("weights", "params", "match"),
    [
        ({"bsn": 1.0}, TermParams(), "did you mean 'bns'"),
        ({"ce": -1.0}, TermParams(), "weight"),
        ({"margin": 1.0}, TermParams(lambda_l=0.8, lambda_u=0.8), "lambda_l < lambda_u"),
        ({"margin": 1.0}, TermParams(lambda_l=0.1, lambda_u=1.5), "bounds"),
    ],
)
def test_bad_objective_input(tiny, weights, params, match) -> None:
    with pytest.raises(DfqError, match=match):
        SampleObjective(tiny[0], weights, params)


def test_bn_terms_need_bn() -> None:
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(DfqError, match="BatchNorm"):
        SampleObjective(flat, {"bns": 1.0})
    assert SampleObjective(flat, {"ce": 1.0})(torch.randn(2, 3, 2, 2), torch.tensor([0, 1]))[0] > 0


def test_per_sample_bn_term_matches_its_definition(tiny) -> None:
    model, prep = tiny
    x = torch.randn(6, *prep.shape)
    loss = SampleObjective(model, {"bns_sample": 1.0})(x, torch.zeros(6, dtype=torch.long))[0]
    expected = []
    for i in range(6):  # each sample alone: its batch statistics are its per-sample statistics
        expected.append(
            SampleObjective(model, {"bns": 1.0})(x[i : i + 1], torch.zeros(1, dtype=torch.long))[0]
        )
    torch.testing.assert_close(loss, torch.stack(expected).mean())
