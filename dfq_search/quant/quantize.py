"""``quantize_(model, plan, example_input)``: swap Conv2d/Linear layers for quantized ones in place.

Two protocols (ALGORITHMS.md §0), never mixed in one table:

- ``generative`` (GDFQ, AdaDFQ, ...): every layer at the plan's bits, first and last included;
  weight ranges min/max recomputed every forward; activation ranges tracked by an EMA.
- ``ptq`` (BRECQ, QDrop, ModCap, ...): the first and last layers at 8 bits; MSE-searched weight
  ranges; running min/max activation ranges (then learnable step sizes).

In both, the image fed to the model is not quantized and BatchNorm is not folded.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfq_search.errors import DfqError, unknown_name
from dfq_search.quant.layers import QUANT_LAYERS, QuantConfig, quant_class
from dfq_search.quant.plan import BitPlan, LayerBits
from dfq_search.quant.quantizers import ActQuantizer, WeightQuantizer
from dfq_search.quant.trace import LayerInfo, trace_layers


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: how ranges are found and which layers are pinned to 8 bits."""

    name: str
    config: QuantConfig
    first_last_bits: int | None

    def plan(self, layers: list[LayerInfo], bits: LayerBits) -> BitPlan:
        """The uniform plan of this protocol at ``bits`` for a model with ``layers``."""
        plan = BitPlan.uniform(bits.w, bits.a)
        if self.first_last_bits is None:
            return plan
        b = self.first_last_bits
        return plan.with_rules({n: {"w": b, "a": b} for n in first_last_names(layers)})


PROTOCOLS = {
    "generative": Protocol("generative", QuantConfig("minmax", act_observer="ema"), None),
    "ptq": Protocol("ptq", QuantConfig("mse", act_observer="minmax"), 8),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise unknown_name("protocol", name, PROTOCOLS, "pass --protocol generative or ptq")
    return PROTOCOLS[name]


def first_last_names(layers: list[LayerInfo]) -> list[str]:
    """The layers that read the model's input (or the first to run) and the last to run."""
    first = [i.name for i in layers if i.reads_model_input] or [layers[0].name]
    return list(dict.fromkeys([*first, layers[-1].name]))


def _as_input(model: nn.Module, example_input: Tensor | tuple[int, ...]) -> Tensor:
    if isinstance(example_input, Tensor):
        return example_input
    device = next(model.parameters()).device
    return torch.zeros(tuple(example_input), device=device)


def quantize_(
    model: nn.Module,
    plan: BitPlan,
    example_input: Tensor | tuple[int, ...],
    config: QuantConfig | None = None,
) -> nn.Module:
    """Replace every Conv2d/Linear the plan covers by its quantized twin, in place; return ``model``.

    A subclass of Conv2d/Linear keeps its own forward (a :class:`QuantSubclass`); one that cannot be
    quantized (its weight is not a parameter, or its forward does not read it) is refused by the trace,
    before anything is swapped, as the cost model refuses it.

    ``example_input`` (a tensor or a shape such as ``(1, 3, 32, 32)``) is run once to find the layers
    that read the model's input (their input stays float unless ``config.quantize_model_input``).
    New activation quantizers start observing: calibrate (e.g. :func:`calibrate_`) before use.
    """
    config = config or QuantConfig()
    if any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
        raise DfqError(
            "model is already quantized", type(model).__name__, "a float model",
            "quantize a fresh copy of the full-precision model",
        )  # fmt: skip
    layers = trace_layers(model, _as_input(model, example_input))
    bits = plan.resolve([i.name for i in layers])
    reads_input = {i.name for i in layers if i.reads_model_input}
    for name, b in bits.items():
        parent, attr = _parent(model, name)
        float_layer = getattr(parent, attr)
        quantize_input = config.quantize_model_input or name not in reads_input
        q = quant_class(type(float_layer)).from_float(float_layer, b.w, b.a, config, quantize_input)
        setattr(parent, attr, q)
    return model


def quantized_copy(
    model: nn.Module,
    plan: BitPlan,
    example_input: Tensor | tuple[int, ...],
    config: QuantConfig | None = None,
) -> nn.Module:
    """A quantized deep copy of ``model``; the original (P) is left untouched."""
    return quantize_(copy.deepcopy(model), plan, example_input, config)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def act_quantizers(model: nn.Module) -> Iterator[ActQuantizer]:
    return (m for m in model.modules() if isinstance(m, ActQuantizer))


def weight_quantizers(model: nn.Module) -> Iterator[WeightQuantizer]:
    return (m for m in model.modules() if isinstance(m, WeightQuantizer))


def set_observing_(model: nn.Module, observing: bool) -> None:
    """Start or stop range tracking of every activation quantizer that is not frozen."""
    for q in act_quantizers(model):
        q.observing = observing and not bool(q.frozen)


def freeze_(model: nn.Module) -> None:
    """Freeze every activation range (they become learnable step sizes)."""
    for q in act_quantizers(model):
        if not q.frozen:
            q.freeze()


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[Tensor], device: torch.device | str = "cpu") -> int:
    """Observe activation ranges on ``batches`` (model in eval mode), then freeze them.

    Returns the number of batches seen. Zero batches is an error: ranges would be undefined.
    """
    was_training = model.training
    model.eval()
    set_observing_(model, True)
    n = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise DfqError("calibration batches", 0, "at least one batch", "give calibration data")
    freeze_(model)
    return n
