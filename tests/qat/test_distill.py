"""End-to-end distillation after PTQ: its augmentations, its loss, what it trains, and that it learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.qat import start_q
from dfq_search.qat.distill import (
    DistillConfig,
    Features,
    adversarial,
    augment,
    distill,
    kl_to_p,
    lowpass,
)
from dfq_search.quant import BitPlan


def _images(n: int, shape, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.6 * torch.randn(n, *shape, generator=gen) + 0.3  # P's "real" data (see conftest)


def test_shift_moves_the_image_and_flip_mirrors_it() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float).view(2, 1, 6, 6)
    flipped = augment(x, DistillConfig(shift=0, flip=True), torch.Generator().manual_seed(0))
    for a, b in zip(flipped, x, strict=True):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
    shifted = augment(x, DistillConfig(shift=1, flip=False), torch.Generator().manual_seed(3))
    assert shifted.shape == x.shape
    # a shift by at most one pixel keeps the centre 4x4 of the image somewhere in a 1-pixel window
    for a, b in zip(shifted, x, strict=True):
        centre = b[0, 1:5, 1:5]
        assert any(torch.equal(a[0, 1 + dy : 5 + dy, 1 + dx : 5 + dx], centre)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # fmt: skip


def test_mixup_is_a_convex_combination_of_two_batch_images() -> None:
    x = torch.stack([torch.full((1, 2, 2), float(v)) for v in (0.0, 1.0, 10.0, 100.0)])
    mixed = augment(x, DistillConfig(flip=False, shift=0, mixup=0.5), torch.Generator().manual_seed(0))
    for m in mixed:
        value = float(m[0, 0, 0])
        assert torch.all(m == value)
        assert 0.0 <= value <= 100.0
    assert not torch.equal(mixed, x)


def test_kl_is_zero_only_when_logits_agree_up_to_a_constant() -> None:
    z = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    assert float(kl_to_p(z, z + 3.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_p(z, z.flip(1), 1.0)) > 0.1
    assert float(kl_to_p(z, z.flip(1), 4.0)) != pytest.approx(float(kl_to_p(z, z.flip(1), 1.0)))


def _q(p, shape):
    return start_q(p, BitPlan.uniform(3, 3), shape, start="rtn", calib_images=64, seed=0)


def _kl(p, q, x) -> float:
    with torch.no_grad():
        return float(kl_to_p(p(x), q(x), 1.0))


def test_distill_brings_q_closer_to_p_on_images_it_never_saw(tiny_p) -> None:
    p, shape = tiny_p
    q, pool, fresh = _q(p, shape), _images(256, shape, 0), _images(256, shape, 1)
    before = _kl(p, q, fresh)
    info = distill(p, q, pool, DistillConfig(steps=60, batch_size=32, lr=1e-3, shift=1))
    assert info["loss_last"] < info["loss_first"]
    assert _kl(p, q, fresh) < 0.8 * before


def test_steps_only_leaves_weights_and_p_untouched(tiny_p) -> None:
    p, shape = tiny_p
    q, pool = _q(p, shape), _images(64, shape)
    p0, q0 = copy.deepcopy(p.state_dict()), copy.deepcopy(q.state_dict())
    distill(p, q, pool, DistillConfig(steps=5, batch_size=16, lr=1e-2, trainable="steps"))
    assert all(torch.equal(v, p.state_dict()[k]) for k, v in p0.items())
    moved = {k for k, v in q.state_dict().items() if not torch.equal(v, q0[k])}
    assert moved and all(k.endswith("scale") for k in moved)


def test_same_seed_same_model(tiny_p) -> None:
    p, shape = tiny_p
    pool = _images(64, shape)
    runs = []
    for _ in range(2):
        q = _q(p, shape)
        distill(p, q, pool, DistillConfig(steps=5, batch_size=16, lr=1e-3, mixup=1.0))
        runs.append(q.state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())


def test_adversarial_images_raise_the_disagreement_within_the_radius(tiny_p) -> None:
    p, shape = tiny_p
    q, x = _q(p, shape), _images(32, shape)
    radius = 0.1 * x.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    xa = adversarial(p, q, x, DistillConfig(adv_steps=3, adv_fraction=0.5), radius)
    moved, kept = xa[:16], xa[16:]
    assert torch.equal(kept, x[16:])
    assert torch.all((moved - x[:16]).abs() <= radius + 1e-6)
    assert not torch.equal(moved, x[:16])
    assert _kl(p, q, moved) > 1.2 * _kl(p, q, x[:16])
    assert all(t.grad is None for t in (*p.parameters(), *q.parameters()))


def test_lowpass_keeps_the_mean_and_damps_only_high_frequencies() -> None:
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    smooth = torch.cos(2 * torch.pi * xx / 16)  # 1/16 cycle per pixel
    checker = (-1.0) ** (xx + yy)  # the Nyquist frequency
    x = torch.stack([smooth, checker, torch.full_like(xx, 3.0)]).unsqueeze(1)
    y = lowpass(x, 0.1)
    # a pure frequency f keeps exp(-f² / 2σ²) of its amplitude: 0.82 at 1/16 cycle per pixel, σ 0.1
    assert float(y[0].std() / x[0].std()) == pytest.approx(math.exp(-((1 / 16) ** 2) / 0.02), rel=1e-3)
    assert float(y[1].abs().max()) < 1e-3
    assert torch.allclose(y[2], x[2], atol=1e-5)
    assert torch.equal(lowpass(x, 0.0), x)


def _feature_error(p, q, x) -> float:
    feats = Features(p, q, x[:1])
    feats.recording = True
    with torch.no_grad():
        p(x), q(x)
    try:
        return float(feats.loss())
    finally:
        feats.remove()


def test_feature_error_is_zero_for_p_itself_and_positive_for_q(tiny_p) -> None:
    p, shape = tiny_p
    x = _images(16, shape)
    assert _feature_error(p, copy.deepcopy(p), x) == pytest.approx(0.0, abs=1e-9)
    assert _feature_error(p, _q(p, shape), x) > 1e-3


def test_feature_matching_lowers_the_units_error_on_unseen_images_and_removes_its_hooks(tiny_p) -> None:
    p, shape = tiny_p
    pool, fresh = _images(128, shape, 0), _images(64, shape, 1)
    after = {}
    for weight in (0.0, 100.0):
        q = _q(p, shape)
        before = _feature_error(p, q, fresh)
        distill(p, q, pool, DistillConfig(steps=80, batch_size=32, lr=3e-3, feature_weight=weight))
        after[weight] = _feature_error(p, q, fresh)
    assert after[100.0] < 0.85 * before
    assert after[100.0] < after[0.0]  # the logits alone do not do it
    assert not any(m._forward_hooks for m in (*p.modules(), *q.modules()))


def test_heldout_keeps_the_most_faithful_state_and_the_start_when_distilling_only_hurts(tiny_p) -> None:
    p, shape = tiny_p
    pool, heldout = _images(128, shape, 0), _images(64, shape, 1)
    q = _q(p, shape)
    good = distill(
        p, q, pool, DistillConfig(steps=60, batch_size=32, lr=1e-3, check_every=20), heldout=heldout
    )
    assert good["kept_step"] in (20, 40, 60)
    assert good["heldout_mse"] < good["heldout_mse_start"]
    start = copy.deepcopy(q.state_dict())
    # a learning rate that wrecks Q: every check is worse than the start, which is what Q ends in
    bad = distill(p, q, pool, DistillConfig(steps=10, batch_size=32, lr=1.0, check_every=5), heldout=heldout)
    assert bad["kept_step"] == 0 and bad["heldout_mse"] == bad["heldout_mse_start"]
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in start.items())


def test_no_adversarial_steps_returns_the_batch_itself(tiny_p) -> None:
    p, shape = tiny_p
    x = _images(8, shape)
    assert adversarial(p, _q(p, shape), x, DistillConfig(adv_steps=0), torch.ones(1)) is x


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": -1.0}, {"temperature": 0.0}, {"shift": -1},
                                 {"trainable": "bn"}, {"mixup": float("nan")}, {"adv_steps": -1},
                                 {"adv_fraction": 1.5}, {"adv_eps": float("inf")}, {"lowpass": -0.1},
                                 {"feature_weight": -1.0}, {"adv_steps": True},
                                 {"check_every": -1}])  # fmt: skip
def test_bad_settings_are_refused(bad) -> None:
    with pytest.raises(DfqError):
        DistillConfig(**bad)
