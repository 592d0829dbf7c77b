"""Fake quantizers: asymmetric uniform quantization with straight-through rounding.

For ``b`` bits the integer grid is ``{0, ..., 2^b - 1}``. A real range ``[lo, hi]`` (widened so it
contains 0, so that zero is exactly representable) maps to

    scale = (hi - lo) / (2^b - 1),   zero_point = round(-lo / scale),
    x_hat = (clamp(round(x / scale) + zero_point, 0, 2^b - 1) - zero_point) * scale.

Weights are quantized per output channel, activations per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
WEIGHT_RANGES = ("minmax", "mse")
ACT_OBSERVERS = ("ema", "minmax")
_EPS = 1e-8


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest in the forward pass, identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


def qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the asymmetric ``bits``-bit grid covering ``[lo, hi]`` and 0."""
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=_EPS)
    return scale, (-lo / scale).round()


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Quantize then dequantize ``x``; gradients flow to ``x`` (STE, zero where clipped) and ``scale``."""
    q = (round_ste(x / scale) + zero_point).clamp(0, 2**bits - 1)
    return (q - zero_point) * scale


class _StepQuant(torch.autograd.Function):
    """:func:`fake_quant` with a per-tensor step size in fewer passes: the same forward (bit for bit)
    and the same gradients as autograd gives through it, d/dx = 1[0 < r < 2^b − 1] and
    d/ds = Σ g · (x̂ − 1[…] · x) / s (LSQ), r the shifted rounded value. The composite keeps ~10
    intermediates and its clamp backward works on a boolean mask, which this CPU build runs ~30x slower
    than float arithmetic; here the mask is a float made with ``sign`` (a reconstruction step spent a
    fifth of its time there)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
        qmax = 2**bits - 1
        v = x / scale
        r = (v.round() - v).add_(v).add_(zero_point)  # as round_ste gives it, for the same mask
        # 1 strictly inside the grid, else 0 (autograd's clamp passes no gradient at the bounds)
        inside = torch.sign(r).clamp_(min=0).mul_(torch.sign(qmax - r).clamp_(min=0))
        out = r.clamp_(0, qmax).sub_(zero_point).mul_(scale)
        ctx.save_for_backward(x, scale, inside, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, scale, inside, out = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (grad * (out - inside * x)).sum().div_(scale).reshape(scale.shape)
        return grad_x, grad_s, None, None


def step_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """:func:`fake_quant` for a scalar ``scale`` and ``zero_point`` (an activation's), computed by
    :class:`_StepQuant`."""
    return _StepQuant.apply(x, scale, zero_point, bits)


def _inference_quant(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """What ``torch.fake_quantize_per_tensor_affine`` computes (bit for bit: x · (1/scale), rounded half
    to even), without autograd. On CUDA that fused kernel; on CPU in-place steps on one new tensor,
    which measured 30x faster than the fused kernel there (2M elements, one thread: 1.0 against 30 ms)."""
    qmax = 2**bits - 1
    if x.is_cuda:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), 0, qmax)
    return x.mul(1.0 / scale).round_().add_(zero_point).clamp_(0, qmax).sub_(zero_point).mul_(scale)


def mse_range(w2d: Tensor, bits: int, p: float = 2.4, steps: int = 80) -> tuple[Tensor, Tensor]:
    """Per-row clipping range minimising the L_p quantization error.

    Scans the shrink ratios ``1 - 0.01 i`` (i < steps) of the min/max range, as BRECQ does, and keeps
    for every row (output channel) the ratio with the least ``mean |w - w_hat|^p``.
    """
    lo0, hi0 = w2d.amin(1).clamp(max=0.0), w2d.amax(1).clamp(min=0.0)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    best_err = torch.full_like(lo0, float("inf"))
    for i in range(steps):
        ratio = 1.0 - 0.01 * i
        lo, hi = lo0 * ratio, hi0 * ratio
        scale, zp = qparams(lo, hi, bits)
        err = (fake_quant(w2d, scale[:, None], zp[:, None], bits) - w2d).abs().pow(p).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _check_bits(bits: int) -> int:
    # Internal invariant: user-supplied bits are validated by the bit plan before they get here.
    assert bits in ALLOWED_BITS, f"bits {bits} not in {ALLOWED_BITS}"
    return bits


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric weight quantizer.

    ``method="minmax"`` recomputes each channel's range from the weight at every forward pass (the
    generative DFQ protocol, so it follows fine-tuning). ``method="mse"`` searches a clipping range
    once (:func:`mse_range`) and keeps it in buffers until :meth:`reset_range`.
    The gradient reaching the weight is the identity (straight-through estimator).
    In inference (no gradient needed) the quantized weight is cached until the weight changes.
    """

    def __init__(self, bits: int, channels: int, method: str = "minmax", p: float = 2.4) -> None:
        super().__init__()
        assert method in WEIGHT_RANGES, method
        self.bits, self.method, self.p = _check_bits(bits), method, p
        self.register_buffer("lo", torch.zeros(channels))
        self.register_buffer("hi", torch.zeros(channels))
        self.register_buffer("searched", torch.zeros((), dtype=torch.bool))
        self._cache: tuple[tuple, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}"

    def reset_range(self) -> None:
        """Forget a searched range (and the cached weight): the next forward searches again."""
        self.searched.fill_(False)
        self._cache = None

    @torch.no_grad()
    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Fix the per-channel range (as a search would); the cached weight is recomputed."""
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        self.searched.fill_(True)
        self._cache = None

    def channel_range(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The (lo, hi) range of every output channel of ``w``, each of shape [out_channels]."""
        w2d = w.detach().flatten(1)
        if self.method == "minmax":
            return w2d.amin(1), w2d.amax(1)
        if not self.searched:
            self.set_range(*mse_range(w2d, self.bits, self.p))
        return self.lo, self.hi

    def quantize(self, w: Tensor) -> Tensor:
        """The dequantized weight (no straight-through term)."""
        lo, hi = self.channel_range(w)
        scale, zp = qparams(lo, hi, self.bits)
        shape = (-1,) + (1,) * (w.dim() - 1)
        with torch.no_grad():
            return fake_quant(w.detach(), scale.view(shape), zp.view(shape), self.bits)

    def forward(self, w: Tensor) -> Tensor:
        if torch.is_grad_enabled() and w.requires_grad:
            self._cache = None
            return w + (self.quantize(w) - w).detach()
        key = (w.data_ptr(), w._version, self.bits, self.method, self.lo._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.quantize(w))
        return self._cache[1]


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with a tracked, then frozen and learnable, range.

    While ``observing`` it updates its range from every batch it sees: an exponential moving average
    of the batch min and max (``observer="ema"``, momentum m, bias-corrected by ``1 - m^t``) or the
    running min and max (``observer="minmax"``), and quantizes with the current range (no quantization
    before the first batch). :meth:`freeze` turns the range into a learnable step size ``scale``
    (an ``nn.Parameter``, trained like LSQ through :func:`fake_quant`) and a fixed zero point.
    Models stay in ``eval()`` during data-free fine-tuning, so observation is an explicit flag, not
    ``self.training``.
    """

    def __init__(self, bits: int, observer: str = "ema", momentum: float = 0.9) -> None:
        super().__init__()
        assert observer in ACT_OBSERVERS, observer
        self.bits, self.observer, self.momentum = _check_bits(bits), observer, momentum
        self.observing, self.enabled = True, True
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("n_obs", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("zero_point", torch.zeros(()))
        self.scale = nn.Parameter(torch.ones(()))

    def extra_repr(self) -> str:
        state = "frozen" if self.frozen else ("observing" if self.observing else "idle")
        return f"bits={self.bits}, observer={self.observer}, {state}"

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold the range of batch ``x`` into the tracked range."""
        bmin, bmax = torch.aminmax(x.detach().float())
        if self.observer == "minmax" and self.n_obs > 0:
            self.lo.copy_(torch.minimum(self.lo, bmin))
            self.hi.copy_(torch.maximum(self.hi, bmax))
        elif self.observer == "minmax":
            self.lo.copy_(bmin)
            self.hi.copy_(bmax)
        else:
            self.lo.mul_(self.momentum).add_((1 - self.momentum) * bmin)
            self.hi.mul_(self.momentum).add_((1 - self.momentum) * bmax)
        self.n_obs += 1

    def tracked_range(self) -> tuple[Tensor, Tensor]:
        """The current range estimate (bias-corrected for the EMA)."""
        if self.observer == "ema":
            correction = 1 - self.momentum ** self.n_obs.item()
            return self.lo / correction, self.hi / correction
        return self.lo, self.hi

    @torch.no_grad()
    def set_range(self, lo: Tensor | float, hi: Tensor | float) -> None:
        """Set the range directly (percentile or MSE calibration) and freeze it."""
        self.lo.fill_(float(lo))
        self.hi.fill_(float(hi))
        self.n_obs.fill_(1)
        if self.observer == "ema":  # store the value so that tracked_range returns it unchanged
            self.lo.mul_(1 - self.momentum)
            self.hi.mul_(1 - self.momentum)
        self.freeze()

    @torch.no_grad()
    def freeze(self) -> None:
        """Stop observing; the range becomes a learnable step size and a fixed zero point."""
        if self.n_obs == 0:
            raise RuntimeError("freeze() before any batch was observed: calibrate the model first")
        scale, zp = qparams(*self.tracked_range(), self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.frozen.fill_(True)
        self.observing = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.frozen:
            scale = self.scale.abs().clamp(min=_EPS)
            if not torch.is_grad_enabled() and x.dtype == torch.float32:
                return _inference_quant(x, scale, self.zero_point, self.bits)
            return step_quant(x, scale, self.zero_point, self.bits)
        if self.observing:
            self.observe(x)
        if self.n_obs == 0:
            return x
        scale, zp = qparams(*self.tracked_range(), self.bits)
        return fake_quant(x, scale, zp, self.bits)
