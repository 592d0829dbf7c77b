"""Cost model: weight size in bits and BOPs (MACs x weight bits x activation bits), per layer.

Computed from one traced forward pass (:func:`trace_layers`) and a bit plan, without building the
quantized model, so a search can check a budget before it spends anything. Float parts count at 32
bits: a layer the plan leaves in float, and the input of a layer that reads the (unquantized) image.
Biases and BatchNorm parameters are not part of the weight size (they stay in float in both protocols).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from dfq_search.quant.plan import BitPlan, LayerBits
from dfq_search.quant.trace import LayerInfo, trace_layers

FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerCost:
    name: str
    params: int
    macs: int
    w_bits: int
    a_bits: int
    size_bits: int
    bops: int


@dataclass(frozen=True)
class ModelCost:
    layers: tuple[LayerCost, ...]

    @property
    def size_bits(self) -> int:
        return sum(c.size_bits for c in self.layers)

    @property
    def bops(self) -> int:
        return sum(c.bops for c in self.layers)

    @property
    def macs(self) -> int:
        return sum(c.macs for c in self.layers)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.layers)

    @property
    def bits_per_param(self) -> float:
        """Weight bits per parameter of every layer, a float one at its float bits (= size_bits / params);
        the search's ``mean_weight_bits`` counts the quantized layers only (:meth:`mean_weight_bits`)."""
        return self.size_bits / max(self.params, 1)

    def mean_weight_bits(self, quantized: Collection[str]) -> float:
        """Weight bits per parameter of the layers named in ``quantized`` (the search's budget figure)."""
        chosen = [c for c in self.layers if c.name in quantized]
        return sum(c.size_bits for c in chosen) / max(sum(c.params for c in chosen), 1)

    def summary(self) -> dict[str, float]:
        return {
            "size_bits": self.size_bits,
            "size_kib": self.size_bits / 8 / 1024,
            "bops": self.bops,
            "gbops": self.bops / 1e9,
            "macs": self.macs,
            "bits_per_param": self.bits_per_param,
        }

    def rows(self) -> list[dict]:
        return [asdict(c) for c in self.layers]


def layer_costs(
    layers: list[LayerInfo], bits: dict[str, LayerBits], quantize_model_input: bool = False
) -> ModelCost:
    """The cost of ``layers`` under resolved per-layer ``bits`` (missing layers count as float)."""
    out = []
    for info in layers:
        b = bits.get(info.name)
        w = b.w if b else FLOAT_BITS
        a = b.a if b and (quantize_model_input or not info.reads_model_input) else FLOAT_BITS
        out.append(LayerCost(info.name, info.params, info.macs, w, a, info.params * w, info.macs * w * a))
    return ModelCost(tuple(out))


def model_cost(
    model: nn.Module, plan: BitPlan, example_input: Tensor, quantize_model_input: bool = False
) -> ModelCost:
    """Weight size and BOPs of ``model`` quantized by ``plan`` (one forward pass of ``example_input``)."""
    layers = trace_layers(model, example_input)
    return layer_costs(layers, plan.resolve([i.name for i in layers]), quantize_model_input)
