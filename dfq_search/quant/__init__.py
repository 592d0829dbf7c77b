"""The quantization core (pure torch): quantizers, quantized layers, bit plans, cost model."""

from dfq_search.quant.cost import LayerCost, ModelCost, layer_costs, model_cost
from dfq_search.quant.layers import QuantConfig, QuantConv2d, QuantLinear, QuantSubclass
from dfq_search.quant.plan import BitPlan, LayerBits, parse_bits
from dfq_search.quant.quantize import (
    PROTOCOLS,
    Protocol,
    calibrate_,
    freeze_,
    get_protocol,
    quantize_,
    quantized_copy,
    set_observing_,
)
from dfq_search.quant.quantizers import ALLOWED_BITS, ActQuantizer, WeightQuantizer, fake_quant
from dfq_search.quant.trace import LayerInfo, trace_layers

__all__ = [
    "ALLOWED_BITS",
    "PROTOCOLS",
    "ActQuantizer",
    "BitPlan",
    "LayerBits",
    "LayerCost",
    "LayerInfo",
    "ModelCost",
    "Protocol",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantSubclass",
    "WeightQuantizer",
    "calibrate_",
    "fake_quant",
    "freeze_",
    "get_protocol",
    "layer_costs",
    "model_cost",
    "parse_bits",
    "quantize_",
    "quantized_copy",
    "set_observing_",
    "trace_layers",
]
