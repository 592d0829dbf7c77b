"""BN-statistics hooks: exact moments and gradients, losses at their minimum, hooks always removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfq_search.errors import DfqError
from dfq_search.synth.bn import bn_loss, bn_statistics, moments, sample_bn_loss


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_moments_match_var_mean_and_gradcheck() -> None:
    x = (0.7 * torch.randn(5, 3, 4, 4, dtype=torch.float64) + 0.3).requires_grad_()
    m, v = moments(x)
    v_ref, m_ref = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close((m, v), (m_ref, v_ref))
    ms, vs = moments(x, per_sample=True)
    vs_ref, ms_ref = torch.var_mean(x, dim=(2, 3), unbiased=False)
    assert ms.shape == (5, 3)
    torch.testing.assert_close((ms, vs), (ms_ref, vs_ref))
    assert torch.autograd.gradcheck(lambda t: moments(t), (x,))
    assert torch.autograd.gradcheck(lambda t: moments(t, per_sample=True), (x,))


def test_bn_loss_zero_when_statistics_match(tiny) -> None:
    model, prep = tiny
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # A batch whose first-BN input statistics equal the running ones exactly: the loss of that layer is 0.
    with bn_statistics(model) as stats:
        model(torch.randn(16, *prep.shape))
        rec = stats.records[0]
        target_gap = (rec.mean - first.running_mean).abs().max()
    assert target_gap > 0  # noise does not match; now make each record match its target
    for r in stats.records:
        r.mean, r.var = r.running_mean.clone(), r.running_var.clone()
    assert bn_loss(stats).item() == 0.0
    assert bn_loss(stats, use_std=True).item() == 0.0


def test_bn_loss_low_on_the_distribution_that_set_the_stats(tiny) -> None:
    model, prep = tiny
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad(), bn_statistics(model, per_sample=True) as stats:
        model(0.6 * torch.randn(256, *prep.shape, generator=gen) + 0.3)
        matched = bn_loss(stats).item()
        per_sample = sample_bn_loss(stats)
        model(torch.randn(256, *prep.shape, generator=gen) * 2)
        other = bn_loss(stats).item()
    assert matched < 0.02 < 1.0 < other
    assert per_sample.shape == (256, len(stats))


def test_hooks_removed_after_exception(tiny) -> None:
    model, _prep = tiny
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), bn_statistics(model, per_sample=True):
        assert _hook_count(model) > before
        raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_model_without_bn_is_refused() -> None:
    with pytest.raises(DfqError, match="BatchNorm"), bn_statistics(nn.Sequential(nn.Linear(2, 2))):
        pass


def test_relative_bn_loss_is_zero_at_the_target_and_scale_free(tiny) -> None:
    model, prep = tiny
    with torch.no_grad(), bn_statistics(model) as stats:
        model(torch.randn(32, *prep.shape))
    for use_std in (False, True):
        assert bn_loss(stats, use_std, relative=True).item() > 0
    # Rescale every layer's target and statistics by s: the relative loss does not move, the absolute one
    # scales by s² (mean term, and σ with use_std) or s⁴ (σ² term).
    scaled = [(r.mean * 10, r.var * 100, r.running_mean * 10, r.running_var * 100) for r in stats.records]
    before = {u: (bn_loss(stats, u, 0.0, relative=True), bn_loss(stats, u, 0.0)) for u in (False, True)}
    for r, (m, v, rm, rv) in zip(stats.records, scaled, strict=True):
        r.mean, r.var, r.running_mean, r.running_var = m, v, rm, rv
    for u in (False, True):
        torch.testing.assert_close(bn_loss(stats, u, eps=0.0, relative=True), before[u][0])
        assert bn_loss(stats, u, eps=0.0).item() > 50 * before[u][1].item()
    for r in stats.records:
        r.mean, r.var = r.running_mean.clone(), r.running_var.clone()
    assert bn_loss(stats, relative=True).item() == 0.0
    assert bn_loss(stats, use_std=True, relative=True).item() == 0.0


def test_the_floor_keeps_a_near_dead_channel_from_dominating_the_relative_loss() -> None:
    from dfq_search.synth.bn import BNRecord, BNStats

    running_var = torch.tensor([2.0, 4.0, 1e-4])  # the third channel is near dead (layer mean ~2)
    shift = torch.tensor([0.1, 0.1, 0.1])
    rec = BNRecord("bn", torch.zeros(3), running_var, mean=shift, var=running_var * 1.1)
    stats = BNStats([rec])
    terms = lambda floor: bn_loss(stats, eps=0.0, relative=True, floor=floor)  # noqa: E731
    # Without the floor the dead channel's shift of 0.1 counts 0.01 / 1e-4 = 100: the loss is all its own.
    assert terms(0.0).item() == pytest.approx((0.01 / 2 + 0.01 / 4 + 0.01 / 1e-4) / 3 + 0.01, rel=1e-5)
    # With floor 0.1 its unit is 0.1 x 2.0 = 0.2: the live channels are measured as before.
    assert terms(0.1).item() == pytest.approx((0.01 / 2 + 0.01 / 4 + 0.01 / 0.2 + 0.01 * 2) / 3, rel=1e-4)
