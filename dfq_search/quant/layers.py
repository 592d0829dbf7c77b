"""Quantized drop-in layers: ``nn.Conv2d`` and ``nn.Linear`` with a weight and an input quantizer.

Each quantized layer quantizes its weight (per output channel) and its input activation (per tensor),
so a layer's activation bits are the bits of the tensor it reads; the quantized model's input image is
left unquantized (``act_quant`` is None for the layers that read it). The layers subclass the float
ones, share their parameters, and keep their state-dict keys (plus the quantizers' buffers).

A subclass of ``nn.Conv2d``/``nn.Linear`` (timm's ``Conv2dSame``, a weight-standardised conv, ...)
becomes a :class:`QuantSubclass`: a class made for it at run time (``Quant<Name>``, inheriting the
subclass) whose forward quantizes the input, then runs the subclass's own forward with ``self.weight``
reading the fake-quantized weight (:func:`weight_as`). What it computes with the weight (padding,
standardisation) is its own; that it reads ``self.weight`` at all is checked when the model is traced
(:func:`check_quantizable`), since a forward that never reads it could not be quantized.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
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


@contextlib.contextmanager
def weight_as(layer: nn.Module, weight: Tensor) -> Iterator[None]:
    """Inside the block ``layer.weight`` reads ``weight``; the parameter itself is left untouched.

    An instance attribute shadows the parameter (``nn.Module`` looks parameters up only when ordinary
    attribute lookup fails), so ``_parameters``, the state dict and optimizers keep the parameter, and
    gradients reach it through ``weight``. The previous attribute, if any, is put back on exit.
    """
    attrs, missing = layer.__dict__, object()
    before = attrs.get("weight", missing)
    attrs["weight"] = weight
    try:
        yield
    finally:
        if before is missing:
            del attrs["weight"]
        else:
            attrs["weight"] = before


def _retyped(layer: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` object with ``layer``'s attributes, in containers of its own (so adding a quantizer to
    it leaves ``layer`` as it was) that hold the same parameters, buffers and submodules."""
    new = cls.__new__(cls)
    state = layer.__getstate__()
    new.__setstate__({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in state.items()})
    return new


class QuantSubclass(_QuantMixin):
    """A quantized subclass of ``nn.Conv2d``/``nn.Linear`` that keeps the subclass's own forward.

    Its classes are made by :func:`quant_class` (``Quant<Name>(QuantSubclass, <Name>)``); ``float_cls``
    is the subclass. The forward quantizes the input, then runs the subclass's forward with
    ``self.weight`` reading ``weight_quant(weight)`` (straight-through, so the gradient reaches the
    parameter, through whatever the subclass computes from it).
    """

    float_cls: type[nn.Module]

    @classmethod
    def from_float(
        cls, layer: nn.Module, w_bits: int, a_bits: int, config: QuantConfig, quantize_input: bool
    ) -> QuantSubclass:
        q = _retyped(layer, cls)  # the subclass's own attributes (its padding, eps, ...) come along
        q._attach(w_bits, a_bits, config, quantize_input)
        return q.to(layer.weight.device)

    def float_layer(self) -> nn.Module:
        """The float layer (a ``float_cls``) with this layer's parameters, without its quantizers."""
        layer = _retyped(self, self.float_cls)
        del layer.weight_quant, layer.act_quant
        return layer

    def forward(self, *args, **kwargs) -> Tensor:
        x, *rest = args
        weight = self.weight_quant(self.weight)
        with weight_as(self, weight):
            return super().forward(self._quant_input(x), *rest, **kwargs)  # the subclass's forward

    def __reduce_ex__(self, protocol):
        # The class is made at run time: pickle refers to the float subclass, which it can find.
        return _new_quant_subclass, (self.float_cls,), self.__getstate__()


@functools.cache
def _subclass_class(float_cls: type[nn.Module]) -> type[QuantSubclass]:
    attrs = {"float_cls": float_cls, "__module__": __name__, "__qualname__": f"Quant{float_cls.__qualname__}"}
    return type(f"Quant{float_cls.__name__}", (QuantSubclass, float_cls), attrs)


def _new_quant_subclass(float_cls: type[nn.Module]) -> QuantSubclass:
    cls = _subclass_class(float_cls)
    return cls.__new__(cls)


QUANTIZABLE = (nn.Conv2d, nn.Linear)
QUANT_LAYERS = (QuantConv2d, QuantLinear, QuantSubclass)
FLOAT_TO_QUANT = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quant_class(float_cls: type[nn.Module]) -> type[_QuantMixin]:
    """The quantized class of a Conv2d/Linear class: QuantConv2d/QuantLinear for the plain ones, the
    :class:`QuantSubclass` made for it (once) for a subclass."""
    assert issubclass(float_cls, QUANTIZABLE) and not issubclass(float_cls, QUANT_LAYERS), float_cls
    return FLOAT_TO_QUANT.get(float_cls) or _subclass_class(float_cls)


def is_subclass_layer(layer: nn.Module) -> bool:
    """A float layer of a strict subclass of nn.Conv2d/nn.Linear (quantized as a QuantSubclass)."""
    return (
        isinstance(layer, QUANTIZABLE)
        and type(layer) not in FLOAT_TO_QUANT
        and not isinstance(layer, QUANT_LAYERS)
    )


@torch.no_grad()
def check_quantizable(name: str, layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse a Conv2d/Linear layer that cannot be quantized, called with ``args``/``kwargs``.

    Its weight must be a parameter of its own (not one computed by a parametrization or by weight
    norm's hook), and a subclass's forward must read ``self.weight``: its output on a random input must
    change when ``self.weight`` reads a random tensor instead. (A random tensor, not ``2w + 1``: weight
    standardisation is blind to any per-channel affine change of the weight.)
    """
    from dfq_search.errors import DfqError

    kind = type(layer).__name__
    if not isinstance(layer._parameters.get("weight"), nn.Parameter):
        raise DfqError(
            f"layer {name!r} ({kind}) has no weight parameter of its own (a parametrization or weight "
            "norm computes it), so its weight cannot be quantized", kind,
            "Conv2d/Linear layers whose weight is an nn.Parameter",
            "remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations, "
            "torch.nn.utils.remove_weight_norm) before quantizing",
        )  # fmt: skip
    if not is_subclass_layer(layer):
        return
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args[0].shape, generator=gen).to(args[0])
    w = layer.weight
    out = layer.forward(x, *args[1:], **kwargs)
    with weight_as(layer, torch.randn(w.shape, generator=gen).to(w)):
        other = layer.forward(x, *args[1:], **kwargs)
    if torch.equal(out, other):
        raise DfqError(
            f"layer {name!r}: the forward of {kind} does not compute with self.weight, so its weight "
            "cannot be quantized", kind, "Conv2d/Linear subclasses whose forward uses self.weight",
            f"make {kind}.forward use self.weight, or use nn.Conv2d/nn.Linear",
        )  # fmt: skip
