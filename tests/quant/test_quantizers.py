import itertools
import math

import pytest
import torch

from dfq_search.quant.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    fake_quant,
    mse_range,
    qparams,
    round_ste,
    step_quant,
)


def literal_quant(values: list[float], bits: int) -> list[float]:
    """Asymmetric min/max quantization written out element by element."""
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    qmax = 2**bits - 1
    scale = max((hi - lo) / qmax, 1e-8)
    zp = round(-lo / scale)
    out = []
    for v in values:
        q = min(max(round(v / scale) + zp, 0), qmax)
        out.append((q - zp) * scale)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quant_matches_literal_reference(bits):
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    got = WeightQuantizer(bits, 5).quantize(w)
    for c in range(5):
        want = literal_quant(w[c].flatten().tolist(), bits)
        assert torch.allclose(got[c].flatten(), torch.tensor(want, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_weight_values_on_grid_in_range_and_few(bits, method):
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) * 3
    wq_module = WeightQuantizer(bits, 16, method)
    wq = wq_module.quantize(w)
    lo, hi = wq_module.channel_range(w)
    scale, zp = qparams(lo, hi, bits)
    for c in range(16):
        codes = wq[c] / scale[c] + zp[c]
        assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the integer grid
        assert codes.min() >= -1e-3 and codes.max() <= 2**bits - 1 + 1e-3
        # the rounded zero point shifts the grid by at most half a step against [lo, hi]
        half = scale[c] / 2 + 1e-6
        assert wq[c].min() >= min(lo[c], 0) - half and wq[c].max() <= max(hi[c], 0) + half
        assert wq[c].unique().numel() <= 2**bits


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_error_falls_as_bits_rise(method):
    torch.manual_seed(1)
    w = torch.randn(32, 16, 3, 3)
    errs = [(WeightQuantizer(b, 32, method).quantize(w) - w).pow(2).mean().item() for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs


def test_mse_range_beats_minmax_on_heavy_tails():
    torch.manual_seed(2)
    w = torch.randn(8, 256)
    w[:, 0] = 12.0  # one outlier per channel
    for bits in (2, 3, 4):
        mm = (WeightQuantizer(bits, 8, "minmax").quantize(w) - w).abs().pow(2.4).mean()
        ms = (WeightQuantizer(bits, 8, "mse").quantize(w) - w).abs().pow(2.4).mean()
        assert ms < mm
    _lo, hi = mse_range(w, 4)
    assert (hi <= 12.0).all() and (hi < 12.0).any()


def test_zero_is_exact_and_constant_channel_survives():
    w = torch.zeros(2, 4)
    w[1] = 0.5
    wq = WeightQuantizer(4, 2).quantize(w)
    assert torch.equal(wq[0], torch.zeros(4))
    assert torch.allclose(wq[1], torch.full((4,), 0.5), atol=1e-6)


def test_weight_ste_gradient_is_identity():
    w = torch.randn(4, 3, requires_grad=True)
    out = WeightQuantizer(2, 4)(w)
    g = torch.randn(4, 3)
    out.backward(g)
    assert torch.equal(w.grad, g)


def test_round_ste_and_fake_quant_gradients():
    x = torch.tensor([0.2, 0.7, 5.0, -3.0], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
    x.grad = None
    scale = torch.tensor(0.1, requires_grad=True)
    out = fake_quant(x, scale, torch.tensor(0.0), 4)  # grid [0, 1.5]
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # clipped values get none
    assert scale.grad is not None and scale.grad != 0  # the step size is learnable


def test_weight_cache_follows_in_place_updates():
    w = torch.nn.Parameter(torch.randn(4, 3))
    q = WeightQuantizer(4, 4)
    with torch.no_grad():
        first = q(w)
        assert q(w) is first  # cached while the weight is unchanged
        w.mul_(2)
        second = q(w)
    assert torch.allclose(second, 2 * first, atol=1e-6)


def test_act_ema_is_bias_corrected_and_freezes():
    q = ActQuantizer(8, "ema", momentum=0.9)
    q(torch.tensor([-1.0, 3.0]))
    lo, hi = q.tracked_range()
    assert math.isclose(lo.item(), -1.0, rel_tol=1e-6) and math.isclose(hi.item(), 3.0, rel_tol=1e-6)
    q(torch.tensor([-3.0, 1.0]))
    lo, hi = q.tracked_range()
    assert math.isclose(lo.item(), (0.9 * 0.1 * -1 + 0.1 * -3) / (1 - 0.81), rel_tol=1e-5)
    q.freeze()
    before = q.scale.item()
    q(torch.tensor([-100.0, 100.0]))  # frozen: no more tracking
    assert q.scale.item() == before and not q.observing
    assert math.isclose(before, (hi - lo).item() / 255, rel_tol=1e-5)


def test_act_minmax_observer_and_set_range():
    q = ActQuantizer(4, "minmax")
    for t in (torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])):
        q(t)
    lo, hi = q.tracked_range()
    assert (lo.item(), hi.item()) == (-1.0, 2.0)
    q2 = ActQuantizer(4, "ema")
    q2.set_range(-0.5, 1.0)
    assert q2.frozen and math.isclose(q2.scale.item(), 1.5 / 15, rel_tol=1e-6)


def test_act_quant_output_on_grid_and_freeze_needs_data():
    q = ActQuantizer(3, "minmax")
    with pytest.raises(RuntimeError, match="calibrate"):
        q.freeze()
    x = torch.rand(1000) * 4 - 1
    q(x)
    q.freeze()
    assert q(x).unique().numel() <= 8


def test_fused_inference_path_matches_training_path():
    q = ActQuantizer(4, "minmax")
    x = torch.randn(4096) * 3
    q(x)
    q.freeze()
    with torch.no_grad():
        fused = q(x)
    slow = q(x).detach()
    # identical but for ties in rounding (x * 1/s versus x / s): at most one step on a few values
    assert (fused - slow).abs().max() <= q.scale.item() * 1.0001
    assert (fused != slow).float().mean() < 0.01


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_inference_path_is_the_fused_kernel_bit_for_bit(bits):
    """The CPU inference path (in-place steps) computes what torch's fused kernel does, ties included."""
    gen = torch.Generator().manual_seed(bits)
    q = ActQuantizer(bits, "minmax")
    x = torch.randn(8, 4, 6, 6, generator=gen) * 3
    q(x)
    q.freeze()
    scale = q.scale.detach().abs()
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.5]) * scale  # halfway cases: rounded to even
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = q(x)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, q.zero_point.to(torch.int32), 0, 2**bits - 1)
    assert torch.equal(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout is kept


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_step_quant_matches_the_autograd_composite(bits):
    """step_quant (the frozen activation's training path) gives fake_quant's values bit for bit and its
    gradients for x and the step size, with values clipped on both sides, on the grid's ends and at
    rounding ties; the layout is kept."""
    gen = torch.Generator().manual_seed(bits)
    x0 = (torch.randn(6, 5, 4, 4, generator=gen) * 4).contiguous(memory_format=torch.channels_last)
    scale, zp = torch.tensor(0.3), torch.tensor(float(2 ** (bits - 1)))
    x0[0, :, 0, 0] = torch.tensor([-zp, 2**bits - 1 - zp, 0.5, 1.5, -2.5]) * scale  # ends and ties
    grad = torch.randn(x0.shape, generator=gen)
    results = []
    for fn in (fake_quant, step_quant):
        x, s = x0.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        out = fn(x, s.abs(), zp, bits)
        (out * grad).sum().backward()
        results.append((out.detach(), x.grad, s.grad))
    (ref, ref_gx, ref_gs), (out, gx, gs) = results
    assert torch.equal(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(gx, ref_gx, rtol=1e-6, atol=1e-7)
    assert (gx == 0).sum() > 0 and (gx != 0).sum() > 0  # both clipped and passed values were tried
    assert torch.allclose(gs, ref_gs, rtol=1e-5, atol=1e-5)


def test_step_quant_skips_gradients_nobody_asked_for():
    x = torch.randn(3, 4, requires_grad=True)
    out = step_quant(x, torch.tensor(0.1), torch.tensor(3.0), 3)  # a step size that is not learned
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
