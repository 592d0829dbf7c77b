"""ONNX export with QDQ nodes: graph structure, and onnxruntime's logits against PyTorch's."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

from dfq_search.data import gaussian_batches
from dfq_search.errors import DfqError
from dfq_search.export import check_onnx, export_onnx, qdq_module
from dfq_search.models import create_model
from dfq_search.ptq import PTQConfig, ReconConfig, run_ptq
from dfq_search.ptq.adaround import attach_adaround_
from dfq_search.quant import (
    ALLOWED_BITS,
    PROTOCOLS,
    ActQuantizer,
    BitPlan,
    LayerBits,
    QuantConv2d,
    QuantLinear,
    calibrate_,
    quantized_copy,
    trace_layers,
)

MODELS = ("tiny_cnn", "tiny_resnet", "tiny_mobilenet")


@pytest.fixture(scope="module")
def onnx():
    """The onnx module (a dependency of dfq_search)."""
    import onnx

    return onnx


def _mixed_plan(bundle) -> BitPlan:
    """Every layer its own bits, cycling through all allowed widths (weights 2/8 side by side)."""
    names = [i.name for i in trace_layers(bundle.model, bundle.preprocess.example_input())]
    n = len(ALLOWED_BITS)
    return BitPlan({name: {"w": ALLOWED_BITS[(5 * i) % n], "a": ALLOWED_BITS[(i + 2) % n]}
                    for i, name in enumerate(names)})  # fmt: skip


PLANS = {"W4A4": lambda bundle: BitPlan.uniform(4, 4), "mixed": _mixed_plan}


def _quantized(name: str, plan: str):
    bundle = create_model(name)
    q = quantized_copy(bundle.model, PLANS[plan](bundle), bundle.preprocess.example_input())
    calibrate_(q, gaussian_batches(bundle.preprocess, 2, 32, 0))
    return bundle, q


def _inputs(bundle) -> torch.Tensor:
    return torch.randn(64, *bundle.preprocess.shape, generator=torch.Generator().manual_seed(1))


def _check_graph(onnx, path, q) -> None:
    """One uint8 weight DQ per quantized layer, one Q -> DQ (and a Clip below 8 bits) per activation
    quantizer, integers within each layer's grid, and no float copy of a quantized weight."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    ops = Counter(n.op_type for n in graph.node)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    acts = [m for m in q.modules() if isinstance(m, ActQuantizer)]
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == len(layers)
    assert ops["QuantizeLinear"] == len(acts)
    assert ops["DequantizeLinear"] == len(layers) + len(acts)
    assert ops["Clip"] >= sum(a.bits < 8 for a in acts)
    for name, layer in layers.items():
        ints = inits[f"{name}.weight.q"]
        assert ints.dtype.name == "uint8" and ints.shape == tuple(layer.weight.shape)
        assert int(ints.max()) <= 2**layer.w_bits - 1
        assert f"{name}.weight" not in inits


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_pytorch(onnx, tmp_path, one_thread, name, plan):
    bundle, q = _quantized(name, plan)
    x = _inputs(bundle)
    with torch.no_grad():
        assert torch.equal(qdq_module(q)(x), q(x))  # the export twin computes exactly what q does
    path = export_onnx(q, bundle.preprocess.example_input(), tmp_path / f"{name}.onnx")
    _check_graph(onnx, path, q)
    result = check_onnx(q, path, x)
    assert result["n"] == 64 and result["top1_agreement"] == 1.0
    assert result["rel_max_abs_diff"] < 1e-3, result


def test_ptq_model_exports_and_matches(onnx, tmp_path, one_thread):
    bundle = create_model("tiny_resnet")
    layers = trace_layers(bundle.model, bundle.preprocess.example_input())
    plan = PROTOCOLS["ptq"].plan(layers, LayerBits(2, 4))
    batches = list(gaussian_batches(bundle.preprocess, 2, 16, 0))
    q = run_ptq(bundle.model, plan, batches, PTQConfig(recon=ReconConfig(iters=3, act_lr=1e-2))).model
    path = export_onnx(q, batches[0][:1], tmp_path / "ptq.onnx", opset=13)
    _check_graph(onnx, path, q)
    result = check_onnx(q, path, [_inputs(bundle)[:32], _inputs(bundle)[32:]])
    assert result["n"] == 64 and result["top1_agreement"] == 1.0
    assert result["rel_max_abs_diff"] < 1e-3, result


def test_float_or_uncalibrated_model_is_refused(tmp_path):
    bundle = create_model("tiny_cnn")
    x = bundle.preprocess.example_input()
    with pytest.raises(DfqError, match="not quantized"):
        export_onnx(bundle.model, x, tmp_path / "m.onnx")
    q = quantized_copy(bundle.model, BitPlan.uniform(4, 4), x)
    with pytest.raises(DfqError, match="not calibrated.*calibrate_"):
        export_onnx(q, x, tmp_path / "m.onnx")
    with pytest.raises(DfqError, match="opset"):
        export_onnx(q, x, tmp_path / "m.onnx", opset=11)


def test_missing_packages_say_how_to_install_them(tmp_path, monkeypatch):
    bundle, q = _quantized("tiny_cnn", "W4A4")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DfqError, match=r"not installed: onnx.*pip install onnx onnxruntime"):
        export_onnx(q, bundle.preprocess.example_input(), tmp_path / "m.onnx")
    with pytest.raises(DfqError, match=r"not installed: onnxruntime.*pip install onnx onnxruntime"):
        check_onnx(q, tmp_path / "m.onnx", _inputs(bundle))


def test_adaround_quantizer_left_in_place(onnx, tmp_path, one_thread):
    bundle = create_model("tiny_cnn")
    x = bundle.preprocess.example_input()
    q = quantized_copy(bundle.model, BitPlan.uniform(3, 4), x, PROTOCOLS["ptq"].config)
    calibrate_(q, gaussian_batches(bundle.preprocess, 2, 32, 0))
    ada = attach_adaround_(q.features[1][0])
    with pytest.raises(DfqError, match="AdaRound"):  # soft rounding is off the grid
        export_onnx(q, x, tmp_path / "m.onnx")
    ada.soft = False
    path = export_onnx(q, x, tmp_path / "m.onnx")
    _check_graph(onnx, path, q)
    assert check_onnx(q, path, _inputs(bundle))["rel_max_abs_diff"] < 1e-3
