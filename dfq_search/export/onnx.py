"""ONNX export of a quantized model, with QuantizeLinear/DequantizeLinear (QDQ) nodes.

    path = export_onnx(q, example_input, "model.onnx")     # q quantized and calibrated
    check_onnx(q, path, inputs)   # {"max_abs_diff": ..., "top1_agreement": ..., ...} vs PyTorch

The quantized model is first turned into an export-friendly twin (:func:`qdq_module`) that computes
exactly what it computes, with every quantizer made explicit:

* weights: each quantized layer's weight is stored as its integers (a ``uint8`` initializer, per
  output channel ``scale`` and ``uint8`` zero point) and dequantized by one ``DequantizeLinear``
  (``axis=0``), so the file holds the low-bit integers, not floats;
* a subclass of Conv2d/Linear with its own forward (:class:`QuantSubclass`) keeps it: the twin runs
  it with ``self.weight`` reading the dequantized integers, so its padding or weight standardisation
  are exported as the ops they are;
* activations: each activation quantizer becomes ``QuantizeLinear -> DequantizeLinear`` with its
  per-tensor scale and ``uint8`` zero point, followed by a ``Clip`` to the PyTorch quantizer's range
  when it has fewer than 8 bits. ONNX has no 2, 3, 5 or 6-bit types (4-bit ones need opset 21): a
  ``b``-bit quantizer stores its values in ``uint8`` and only uses ``0 .. 2^b - 1`` of it (weights
  are already on that grid; for activations the ``Clip`` after ``DequantizeLinear`` gives exactly the
  ``0 .. 2^b - 1`` clamp).

Rounding: onnxruntime's QuantizeLinear divides by the scale, PyTorch's fused fake quantization
multiplies by the scale's reciprocal. The two round apart only when ``x / scale`` lies within a float
rounding error of a half-integer, which then moves that one value by one step: for tiny_mobilenet
W8A8 on 64 random images this happened to one activation value, leaving the logits 2e-5 apart.

Float parts (BatchNorm, biases, the unquantized model input) stay float, as in PyTorch. The graph is
written by torch's TorchScript exporter (``dynamo=False``), the quantizer nodes by the ``symbolic``
of two autograd functions; no ``onnxscript`` is needed. onnx and onnxruntime are main dependencies.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfq_search.errors import DfqError
from dfq_search.ptq.adaround import AdaRoundWeightQuantizer
from dfq_search.quant.layers import QUANT_LAYERS, QuantConv2d, QuantLinear, QuantSubclass, weight_as
from dfq_search.quant.quantizers import ActQuantizer, qparams

DEFAULT_OPSET = 17
MIN_OPSET = 13  # per-axis DequantizeLinear
_EPS = 1e-8  # as in ActQuantizer.forward
_INSTALL = "pip install onnx onnxruntime (dependencies of dfq_search: reinstall it)"


def _require(*modules: str) -> None:
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DfqError(
            "ONNX export and checking need onnx and onnxruntime", f"not installed: {', '.join(missing)}",
            "both installed (dependencies of dfq_search)", _INSTALL,
        )  # fmt: skip


class _DequantizeWeight(torch.autograd.Function):
    """(q - zero_point) * scale per output channel; exported as one DequantizeLinear (axis 0)."""

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (q.dim() - 1)
        ints = q.to(torch.int32) - zero_point.to(torch.int32).view(shape)
        return ints.to(scale.dtype) * scale.view(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)


class _FakeQuantizeAct(torch.autograd.Function):
    """The frozen ActQuantizer's fused fake quantization; exported as Q -> DQ (-> Clip below 8 bits)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax: int, lo: float, hi: float) -> Tensor:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), 0, qmax)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmax, lo, hi):
        y = g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)
        if qmax == 255:
            return y
        lo_c = g.op("Constant", value_t=torch.tensor(lo, dtype=torch.float32))
        hi_c = g.op("Constant", value_t=torch.tensor(hi, dtype=torch.float32))
        return g.op("Clip", y, lo_c, hi_c)


class QDQActivation(nn.Module):
    """A frozen activation quantizer: per-tensor scale, uint8 zero point, grid ``0 .. 2^bits - 1``."""

    def __init__(self, quantizer: ActQuantizer) -> None:
        super().__init__()
        self.bits = quantizer.bits
        scale = quantizer.scale.detach().abs().clamp(min=_EPS).float()
        zp = int(quantizer.zero_point)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", torch.tensor(zp, dtype=torch.uint8))
        # The DequantizeLinear values of the integers 0 and 2^bits - 1, computed as onnxruntime does.
        qmax = 2**self.bits - 1
        self.qmax = qmax
        self.lo = float(torch.tensor(float(0 - zp)) * scale)
        self.hi = float(torch.tensor(float(qmax - zp)) * scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"

    def forward(self, x: Tensor) -> Tensor:
        return _FakeQuantizeAct.apply(x, self.scale, self.zero_point, self.qmax, self.lo, self.hi)


class QDQWeight(nn.Module):
    """A quantized weight as integers (uint8), per-channel scale and uint8 zero point."""

    def __init__(self, q: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("q", q.to(torch.uint8))
        self.register_buffer("scale", scale.float().clone())
        self.register_buffer("zero_point", zero_point.to(torch.uint8))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.q.shape)}"

    def forward(self) -> Tensor:
        return _DequantizeWeight.apply(self.q, self.scale, self.zero_point)


@torch.no_grad()
def _weight_integers(name: str, layer: nn.Module) -> QDQWeight:
    """The integers of ``layer``'s quantized weight, checked to dequantize to exactly what it uses."""
    wq, w = layer.weight_quant, layer.weight.detach()
    expected = wq(layer.weight)
    if isinstance(wq, AdaRoundWeightQuantizer):  # hard rounding left in place: its own grid
        if wq.soft:
            raise DfqError(
                "AdaRound reconstruction in progress", f"{name} has soft (learned) rounding",
                "hard-rounded weights", "export the model that run_ptq returns (rounding finalized)",
            )  # fmt: skip
        scale, zp = wq.step.flatten(), wq.zp.flatten()
    else:
        scale, zp = qparams(*wq.channel_range(w), wq.bits)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = (expected / scale.view(shape)).round() + zp.view(shape)
    q = q.clamp(0, 2**wq.bits - 1)
    got = (q - zp.view(shape)) * scale.view(shape)
    if not torch.equal(got, expected):  # an internal invariant: the weights lie on the grid
        raise RuntimeError(f"{name}: quantized weight is off its grid by {(got - expected).abs().max()}")
    return QDQWeight(q, scale, zp, wq.bits)


def _activation(name: str, quantizer: ActQuantizer | None) -> QDQActivation | None:
    if quantizer is None or not quantizer.enabled:
        return None
    if not bool(quantizer.frozen):
        raise DfqError(
            "activation ranges are not calibrated", f"{name}.act_quant is not frozen",
            "a calibrated model (every activation range frozen)",
            "run dfq_search.quant.calibrate_(model, batches) (or run_ptq) before exporting",
        )  # fmt: skip
    return QDQActivation(quantizer)


class QDQConv2d(nn.Module):
    """A QuantConv2d with explicit quantizers (what :func:`qdq_module` puts in its place)."""

    def __init__(self, name: str, layer: QuantConv2d) -> None:
        super().__init__()
        self.act = _activation(name, layer.act_quant)
        self.weight = _weight_integers(name, layer)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
        self.padding, self.padding_mode = layer.padding, layer.padding_mode
        self.pad = layer._reversed_padding_repeated_twice

    def forward(self, x: Tensor) -> Tensor:
        x = x if self.act is None else self.act(x)
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward
            x = F.pad(x, self.pad, mode=self.padding_mode)
            return F.conv2d(x, self.weight(), self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class QDQLinear(nn.Module):
    """A QuantLinear with explicit quantizers."""

    def __init__(self, name: str, layer: QuantLinear) -> None:
        super().__init__()
        self.act = _activation(name, layer.act_quant)
        self.weight = _weight_integers(name, layer)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x if self.act is None else self.act(x), self.weight(), self.bias)


class QDQSubclass(nn.Module):
    """A quantized Conv2d/Linear subclass with explicit quantizers, running the subclass's own forward
    (its padding, its use of the weight) with ``self.weight`` reading the dequantized integers."""

    def __init__(self, name: str, layer: QuantSubclass) -> None:
        super().__init__()
        self.act = _activation(name, layer.act_quant)
        self.weight = _weight_integers(name, layer)
        self.layer = layer.float_layer()
        del self.layer.weight  # the integers replace the float weight in the graph

    def forward(self, *args, **kwargs) -> Tensor:
        x, *rest = args
        with weight_as(self.layer, self.weight()):
            return self.layer(x if self.act is None else self.act(x), *rest, **kwargs)


def _check_quantized(model: nn.Module) -> None:
    if not any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
        raise DfqError(
            "model is not quantized", type(model).__name__,
            "a quantized, calibrated model (quantized_copy + calibrate_, run_ptq or load_quantized)",
            "quantize and calibrate the model before exporting it",
        )  # fmt: skip


@torch.no_grad()
def qdq_module(model: nn.Module) -> nn.Module:
    """A CPU, eval-mode copy of the quantized ``model`` whose layers hold explicit QDQ quantizers.

    It computes in PyTorch exactly what ``model`` computes in eval mode; ``model`` is not modified.
    """
    _check_quantized(model)
    twin = copy.deepcopy(model).cpu().float().eval()
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, QUANT_LAYERS):
            parent_name, _, attr = name.rpartition(".")
            parent = twin.get_submodule(parent_name) if parent_name else twin
            kinds = ((QuantSubclass, QDQSubclass), (QuantConv2d, QDQConv2d), (QuantLinear, QDQLinear))
            cls = next(qdq for kind, qdq in kinds if isinstance(layer, kind))
            setattr(parent, attr, cls(name, layer))
    stray = [n for n, m in twin.named_modules() if isinstance(m, ActQuantizer) and m.enabled]
    if stray:  # an activation quantizer outside a quantized layer would be silently dropped
        raise DfqError(
            "activation quantizer outside a quantized layer", stray[0], "quantizers inside "
            "QuantConv2d/QuantLinear only", "quantize the model with dfq_search.quant",
        )  # fmt: skip
    return twin


def _as_input(example_input: Tensor | tuple[int, ...]) -> Tensor:
    if isinstance(example_input, Tensor):
        return example_input.detach().float().cpu()
    return torch.zeros(tuple(example_input))


def export_onnx(
    model: nn.Module,
    example_input: Tensor | tuple[int, ...],
    path: str | Path,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the quantized, calibrated ``model`` to ``path`` as an ONNX graph with QDQ nodes.

    ``example_input`` is a batch (or its shape, e.g. ``(1, 3, 32, 32)``); the batch axis of the
    input ``"input"`` and output ``"logits"`` is dynamic. Returns ``path`` (checked by onnx's checker).
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise DfqError("ONNX opset", opset, f"an int >= {MIN_OPSET} (per-channel DequantizeLinear)",
                       f"e.g. opset={DEFAULT_OPSET}")  # fmt: skip
    twin = qdq_module(model)  # refuses a float or uncalibrated model before the packages are needed
    _require("onnx")
    import onnx

    x = _as_input(example_input)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        # option-A shortcuts slice with a step of 2, which the exporter cannot constant-fold: harmless
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            twin, (x,), str(path), opset_version=opset, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kwargs,
        )  # fmt: skip
    onnx.checker.check_model(str(path))
    return path


def _batches(inputs: Tensor | Iterable) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    return [b[0] if isinstance(b, (tuple, list)) else b for b in inputs]


@torch.no_grad()
def check_onnx(model: nn.Module, path: str | Path, inputs: Tensor | Iterable) -> dict:
    """Run ``path`` in onnxruntime (CPU) and ``model`` in PyTorch (eval mode) on ``inputs``.

    ``inputs`` is a batch or an iterable of batches (or of (input, label) pairs). Returns ``n`` (images),
    ``max_abs_diff`` of the logits, ``logit_scale`` (largest |PyTorch logit|), their ratio
    ``rel_max_abs_diff`` and ``top1_agreement`` (fraction of images with the same arg-max).
    """
    _check_quantized(model)
    _require("onnxruntime")
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DfqError("ONNX file not found", str(path), "a file written by export_onnx", "check the path")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ref, out = [], []
    try:
        for x in _batches(inputs):
            ref.append(model(x.to(device)).float().cpu())
            out.append(torch.from_numpy(session.run(None, {in_name: x.detach().float().cpu().numpy()})[0]))
    finally:
        model.train(was_training)
    if not ref:
        raise DfqError("check inputs", 0, "at least one batch", "give input batches")
    ref_t, out_t = torch.cat(ref), torch.cat(out)
    diff = float((ref_t - out_t).abs().max())
    scale = float(ref_t.abs().max())
    return {
        "n": ref_t.shape[0],
        "max_abs_diff": diff,
        "logit_scale": scale,
        "rel_max_abs_diff": diff / max(scale, 1e-12),
        "top1_agreement": float((ref_t.argmax(1) == out_t.argmax(1)).float().mean()),
    }
