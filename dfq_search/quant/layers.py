"""Quantized drop-in layers: ``nn.Conv2d`` and ``nn.Linear`` with a weight and an input quantizer.

Each quantized layer quantizes its weight (per output channel) and its input activation (per tensor),
so a layer's activation bits are the bits of the tensor it reads; the quantized model's input image is
left unquantized (``act_quant`` is None for the layers that read it). The layers subclass the float
ones, share their parameters, and keep their state-dict keys (plus the quantizers' buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dfq_search.quant.quantizers import ACT_OBSERVERS, WEIGHT_RANGES, ActQuantizer, WeightQuantizer


@dataclass(frozen=True)
class QuantConfig:
    """How ranges are found (the bits come from the bit plan).

    weight_range: "minmax" (recomputed every forward) or "mse" (searched once, L_p with ``weight_p``).
    act_observer: "ema" (momentum ``act_momentum``, bias-corrected) or "minmax" (running min/max).
    quantize_model_input: also quantize the image fed to the model (both protocols leave it in float).
    """

    weight_range: str = "minmax"
    weight_p: float = 2.4
    act_observer: str = "ema"
    act_momentum: float = 0.9
    quantize_model_input: bool = False

    def __post_init__(self) -> None:
        from dfq_search.errors import DfqError

        if self.weight_range not in WEIGHT_RANGES:
            raise DfqError("weight_range", self.weight_range, f"one of {WEIGHT_RANGES}", "pick one")
        if self.act_observer not in ACT_OBSERVERS:
            raise DfqError("act_observer", self.act_observer, f"one of {ACT_OBSERVERS}", "pick one")
        if not 0.0 < self.act_momentum < 1.0:
            raise DfqError("act_momentum", self.act_momentum, "in (0, 1)", "e.g. 0.9")


class _QuantMixin:
    """Shared construction of the quantizers of a quantized layer."""

    weight_quant: WeightQuantizer
    act_quant: ActQuantizer | None

    def _attach(self, w_bits: int, a_bits: int, config: QuantConfig, quantize_input: bool) -> None:
        channels = self.weight.shape[0]
        self.weight_quant = WeightQuantizer(w_bits, channels, config.weight_range, config.weight_p)
        self.act_quant = (
            ActQuantizer(a_bits, config.act_observer, config.act_momentum) if quantize_input else None
        )

    @property
    def w_bits(self) -> int:
        return self.weight_quant.bits

    @property
    def a_bits(self) -> int | None:
        return None if self.act_quant is None else self.act_quant.bits

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, w_bits: int, a_bits: int, config: QuantConfig, quantize_input: bool
    ) -> QuantConv2d:
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )  # fmt: skip
        q.weight, q.bias = conv.weight, conv.bias
        q._attach(w_bits, a_bits, config, quantize_input)
        return q.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.weight_quant(self.weight), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    @classmethod
    def from_float(
        cls, linear: nn.Linear, w_bits: int, a_bits: int, config: QuantConfig, quantize_input: bool
    ) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._attach(w_bits, a_bits, config, quantize_input)
        return q.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x), self.weight_quant(self.weight), self.bias)


QUANTIZABLE = (nn.Conv2d, nn.Linear)
QUANT_LAYERS = (QuantConv2d, QuantLinear)
FLOAT_TO_QUANT = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
