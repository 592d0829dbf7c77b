"""AdaRound: learn whether each weight rounds up or down (Nagel et al. 2020), ALGORITHMS.md §7.

With the per-channel grid (scale s, zero point z, ``b`` bits) of the layer's weight quantizer,

    W̃ = s · (clip(⌊W/s⌋ + h(V) + z, 0, 2^b − 1) − z),   h(V) = clip(1.2 σ(V) − 0.1, 0, 1),

V is initialised so that h(V) equals the fractional part W/s − ⌊W/s⌋ (so the first soft weight is W
itself, up to clipping), and the regulariser ``f_reg = Σ 1 − |2h(V) − 1|^β`` pushes every h(V) to 0 or
1 as β anneals from 20 to 2. At the end the rounding is made hard: h = 1[V ≥ 0].

``⌊W/s⌋`` and the grid are computed once (buffers); a step only evaluates σ(V).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfq_search.quant.quantizers import WeightQuantizer, qparams

_ZETA, _GAMMA = 1.1, -0.1  # h = clip(σ(V)·(ζ − γ) + γ, 0, 1)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """h(V) = clip(1.2 σ(V) − 0.1, 0, 1)."""
    return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """V with h(V) = ``h`` for h in [0, 1): σ(V) = (h + 0.1) / 1.2."""
    p = (h - _GAMMA) / (_ZETA - _GAMMA)
    return torch.log(p / (1 - p))


def beta_at(step: int, total: int, b_start: float, b_end: float, warmup: float) -> float | None:
    """The annealed exponent β at ``step`` of ``total``; None during the warm-up (no regulariser).

    After the warm-up (the first ``warmup · total`` steps) β falls linearly from ``b_start`` to
    ``b_end``, reaching it at the last step.
    """
    start = int(warmup * total)
    if step < start:
        return None
    rel = (step - start) / max(total - 1 - start, 1)
    return b_end + (b_start - b_end) * max(0.0, 1.0 - rel)


class AdaRoundWeightQuantizer(WeightQuantizer):
    """A drop-in replacement of a layer's ``weight_quant`` whose rounding is learned (``self.v``).

    It quantizes the weight it was built from (the argument of ``forward`` is only checked), on the
    grid the original quantizer chose (its MSE-searched range), soft while ``soft`` is True, hard
    (h = 1[V ≥ 0]) afterwards.
    """

    def __init__(self, base: WeightQuantizer, weight: Tensor) -> None:
        super().__init__(base.bits, weight.shape[0], base.method, base.p)
        self._base = (base,)  # a tuple, so the original is not registered as a submodule
        lo, hi = base.channel_range(weight)
        self.set_range(lo, hi)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        scale, zp = qparams(lo, hi, self.bits)
        w = weight.detach() / scale.view(shape)
        if w.dim() == 4:  # CPU convolutions compute weight gradients ~8x faster in channels_last
            w = w.contiguous(memory_format=torch.channels_last)
        self.register_buffer("step", scale.view(shape).clone())
        self.register_buffer("zp", zp.view(shape).clone())
        self.register_buffer("w_floor", w.floor())
        self.v = nn.Parameter(inverse_rectified_sigmoid(w - w.floor()))
        self.soft = True

    @property
    def base(self) -> WeightQuantizer:
        return self._base[0]

    def h(self) -> Tensor:
        """Soft rounding h(V) in [0, 1], or the hard 1[V ≥ 0] once ``soft`` is False."""
        return rectified_sigmoid(self.v) if self.soft else (self.v >= 0).to(self.v.dtype)

    def regularizer(self, beta: float) -> Tensor:
        """f_reg = Σ 1 − |2h(V) − 1|^β (zero when every h is 0 or 1)."""
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def forward(self, w: Tensor) -> Tensor:
        assert w.shape == self.w_floor.shape, "AdaRound quantizer used with another weight"
        q = (self.w_floor + self.h() + self.zp).clamp(0, 2**self.bits - 1)
        return (q - self.zp) * self.step


def attach_adaround_(layer: nn.Module) -> AdaRoundWeightQuantizer:
    """Swap ``layer.weight_quant`` for an :class:`AdaRoundWeightQuantizer` of its weight."""
    if isinstance(layer.weight_quant, AdaRoundWeightQuantizer):
        return layer.weight_quant
    ada = AdaRoundWeightQuantizer(layer.weight_quant, layer.weight).to(layer.weight.device)
    layer.weight_quant = ada
    return ada


@torch.no_grad()
def finalize_adaround_(layer: nn.Module) -> None:
    """Make the rounding hard, write W̃ into ``layer.weight`` and put the original quantizer back.

    W̃ lies on the original grid, so the original (MSE-range) quantizer maps it to itself: the
    layer is again a plain quantized layer, whose state dict loads into a fresh quantized copy.
    """
    ada = layer.weight_quant
    if not isinstance(ada, AdaRoundWeightQuantizer):
        return
    ada.soft = False
    layer.weight.copy_(ada(layer.weight))
    base = ada.base
    base.set_range(ada.lo, ada.hi)
    layer.weight_quant = base
