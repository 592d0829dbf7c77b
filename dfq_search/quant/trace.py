"""One traced forward pass: which Conv2d/Linear layers run, in what order, on what shapes.

Every layer it lists can be quantized (:func:`check_quantizable` refuses the others, e.g. a subclass
whose forward never reads ``self.weight``), so the cost model counts exactly what ``quantize_`` builds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfq_search.quant.layers import QUANTIZABLE, check_quantizable


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer as one forward pass saw it (MACs are per input sample)."""

    name: str
    kind: str  # "conv" or "linear"
    order: int  # position of its first call in the forward pass
    params: int  # weight elements (bias excluded)
    macs: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    reads_model_input: bool  # its input is the model's input tensor itself
    depthwise: bool


def _macs(module: nn.Module, out: Tensor) -> int:
    per_output = module.weight[0].numel()  # in_channels/groups * kh * kw, or in_features
    return int(out[0].numel() * per_output)


@contextlib.contextmanager
def _recording(model: nn.Module, example: Tensor) -> Iterator[list[LayerInfo]]:
    found: list[LayerInfo] = []
    seen: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, kwargs: dict, out: Tensor) -> None:
            if name in seen:  # a layer called twice (weight sharing): count its MACs each time
                i = seen[name]
                prev = found[i]
                found[i] = LayerInfo(**{**prev.__dict__, "macs": prev.macs + _macs(module, out)})
                return
            check_quantizable(name, module, inputs, kwargs)  # what the cost counts, quantize_ must build
            seen[name] = len(found)
            groups = getattr(module, "groups", 1)
            found.append(
                LayerInfo(
                    name=name,
                    kind="conv" if isinstance(module, nn.Conv2d) else "linear",
                    order=len(found),
                    params=module.weight.numel(),
                    macs=_macs(module, out),
                    in_shape=tuple(inputs[0].shape[1:]),
                    out_shape=tuple(out.shape[1:]),
                    reads_model_input=inputs[0] is example,
                    depthwise=groups > 1 and groups == module.weight.shape[0],
                )
            )

        return record

    handles = [
        m.register_forward_hook(hook(n), with_kwargs=True)
        for n, m in model.named_modules()
        if isinstance(m, QUANTIZABLE)
    ]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def trace_layers(model: nn.Module, example_input: Tensor) -> list[LayerInfo]:
    """Run ``model`` once on ``example_input`` (batch of 1 is enough) and list its layers in call order.

    The model's mode and its BatchNorm statistics are left as they were.
    """
    was_training = model.training
    model.eval()
    try:
        with _recording(model, example_input) as found, torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
    if not found:
        from dfq_search.errors import DfqError

        raise DfqError(
            "model has no Conv2d or Linear layer that runs in forward()", type(model).__name__,
            "a CNN classifier built from nn.Conv2d / nn.Linear", "pass a model that uses them",
        )  # fmt: skip
    return found
