"""Subclasses of Conv2d/Linear with their own forward: quantized with that forward kept (padding, weight
standardisation), or refused when they cannot be; and the cost model agrees with the built model for
every registered model."""

from __future__ import annotations

import copy
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch
from dfq_subclass_helper import (
    Conv2dSame,
    Conv2dStaticSame,
    CosineLinear,
    NoWeightConv,
    StdConv2d,
    SubclassNet,
)
from torch import nn

from dfq_search.checkpoint import load_quantized, save_quantized
from dfq_search.data import gaussian_batches
from dfq_search.errors import DfqError
from dfq_search.models import create_model, list_models
from dfq_search.ptq.adaround import attach_adaround_, finalize_adaround_
from dfq_search.quant import (
    ALLOWED_BITS,
    PROTOCOLS,
    ActQuantizer,
    BitPlan,
    calibrate_,
    model_cost,
    quantized_copy,
    trace_layers,
)
from dfq_search.quant.layers import QUANT_LAYERS, QuantConv2d, QuantSubclass
from dfq_search.quant.quantize import first_last_names

HELPER = "dfq_subclass_helper:build"
SHAPE = (1, 3, 16, 16)
SUBCLASSES = {"stem.0": Conv2dStaticSame, "block.0": Conv2dSame, "std.0": StdConv2d, "head": CosineLinear}


@pytest.fixture
def net(with_running_stats) -> nn.Module:
    torch.manual_seed(0)
    return with_running_stats(SubclassNet(), SHAPE[1:])


def _noise(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def _calibrated(net: nn.Module, plan: BitPlan, protocol: str = "generative") -> nn.Module:
    q = quantized_copy(net, plan, SHAPE, PROTOCOLS[protocol].config)
    calibrate_(q, [_noise(32, seed) for seed in (2, 3)])
    return q.eval()


def test_subclasses_are_quantized_at_the_plan_bits_with_their_forward(net):
    plan = BitPlan.uniform(4, 6).with_rules({"std.0": {"w": 3, "a": 5}})
    q = quantized_copy(net, plan, SHAPE)
    for name, cls in SUBCLASSES.items():
        layer = q.get_submodule(name)
        assert isinstance(layer, QuantSubclass) and isinstance(layer, cls) and isinstance(layer, QUANT_LAYERS)
        assert type(layer).__name__ == f"Quant{cls.__name__}" and layer.float_cls is cls
        assert layer.w_bits == (3 if name == "std.0" else 4)
    assert q.stem[0].act_quant is None and q.std[0].a_bits == 5 and q.head.a_bits == 6
    assert type(q.pw[0]) is QuantConv2d  # a plain conv takes the plain path
    assert isinstance(q.stem[0].static_padding, nn.ZeroPad2d)  # the subclass's own attributes kept
    assert q.state_dict().keys() >= net.state_dict().keys()  # keys unchanged (plus the quantizers')
    assert not any(isinstance(m, QUANT_LAYERS) for m in net.modules())  # P untouched


def test_the_forward_is_the_subclass_forward_with_the_quantized_weight(net):
    q = quantized_copy(net, BitPlan.uniform(3, 8), SHAPE)
    layer, x = q.block[0], torch.randn(2, 8, 8, 8)
    layer.act_quant.observing = False  # no range yet: the input passes unquantized
    reference = copy.deepcopy(net.block[0])
    with torch.no_grad():
        reference.weight.copy_(layer.weight_quant(layer.weight))
        assert torch.equal(layer(x), reference(x))  # asymmetric "same" padding, on the 3-bit weight
    assert "weight" not in vars(layer) and layer.weight is layer._parameters["weight"]  # swap undone


def test_w8a8_agrees_with_float(net):
    x = _noise(512, seed=7)
    for protocol in PROTOCOLS:
        q = _calibrated(net, BitPlan.uniform(8, 8), protocol)
        with torch.no_grad():
            agree = (q(x).argmax(1) == net(x).argmax(1)).float().mean()
        assert agree >= 0.99, (protocol, agree)


def test_gradients_reach_the_weights_and_adaround_works(net):
    q = _calibrated(net, BitPlan.uniform(4, 4))
    q(_noise(8)).pow(2).mean().backward()
    for name in SUBCLASSES:
        layer = q.get_submodule(name)
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
    assert q.std[0].act_quant.scale.grad is not None
    layer = q.std[0]
    weight = layer.weight
    ada = attach_adaround_(layer)  # reconstruction swaps the weight quantizer, reads layer.weight
    q(_noise(8)).pow(2).mean().backward()
    assert ada.v.grad is not None and ada.v.grad.abs().sum() > 0
    finalize_adaround_(layer)
    assert layer.weight is weight and isinstance(layer._parameters["weight"], nn.Parameter)


def test_deepcopy_pickle_and_state_dict_round_trip(net):
    plan = BitPlan.uniform(4, 4)
    q, x = _calibrated(net, plan, "ptq"), _noise(8)
    with torch.no_grad():
        want = q(x)
        for again in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
            assert type(again.block[0]) is type(q.block[0]) and torch.equal(again(x), want)
        fresh = quantized_copy(net, plan, SHAPE, PROTOCOLS["ptq"].config)
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(fresh.eval()(x), want)


def test_checkpoint_round_trip(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    bundle = create_model(HELPER, input_size=16)
    plan, config = BitPlan.uniform(4, 4), PROTOCOLS["ptq"].config
    q = quantized_copy(bundle.model, plan, bundle.preprocess.example_input(), config)
    calibrate_(q, gaussian_batches(bundle.preprocess, 2, 16, 0))
    path = save_quantized(tmp_path / "q.pt", q, bundle.name, 10, plan, config, bundle.preprocess)
    again, _ = load_quantized(path)
    assert isinstance(again.block[0], QuantSubclass) and isinstance(again.block[0], Conv2dSame)
    x = bundle.preprocess.example_input(4) + _noise(4)
    assert torch.equal(q.eval()(x), again(x))


@pytest.fixture(scope="module")
def onnx():
    import onnx

    return onnx


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # timm's padding reads the input's size
def test_onnx_round_trip(onnx, net, tmp_path, one_thread):
    from dfq_search.export import check_onnx, export_onnx, qdq_module

    names = [i.name for i in trace_layers(net, torch.zeros(SHAPE))]
    plan = BitPlan(
        {n: {"w": ALLOWED_BITS[(2 * i) % 6], "a": ALLOWED_BITS[(i + 2) % 6]} for i, n in enumerate(names)}
    )
    q, x = _calibrated(net, plan), _noise(64, seed=5)
    with torch.no_grad():
        assert torch.equal(qdq_module(q)(x), q(x))  # the twin keeps the padding and standardisation
    path = export_onnx(q, SHAPE, tmp_path / "subclass.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    ops = Counter(n.op_type for n in graph.node)
    acts = [m for m in q.modules() if isinstance(m, ActQuantizer)]
    assert ops["DequantizeLinear"] == len(names) + len(acts) and ops["QuantizeLinear"] == len(acts)
    assert ops["Pad"] >= 2  # both "same" paddings are in the graph
    for name in names:
        ints = inits[f"{name}.weight.q"]
        assert ints.dtype.name == "uint8" and int(ints.max()) <= 2 ** q.get_submodule(name).w_bits - 1
        assert f"{name}.weight" not in inits and f"{name}.layer.weight" not in inits  # no float copy
    result = check_onnx(q, path, x)
    assert result["top1_agreement"] == 1.0 and result["rel_max_abs_diff"] < 1e-3, result


def test_what_cannot_be_quantized_is_refused_by_cost_and_quantize_alike():
    x = torch.zeros(1, 3, 8, 8)
    no_weight = nn.Sequential(nn.Conv2d(3, 4, 3), NoWeightConv(4, 4, 3))
    norm = nn.Sequential(nn.Conv2d(3, 4, 3), torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3)))
    for model, match in ((no_weight, "does not compute with self.weight"), (norm, "no weight parameter")):
        for build in (quantized_copy, model_cost):
            with pytest.raises(DfqError, match=match):
                build(model, BitPlan.uniform(4, 4), x)


def test_other_layer_types_are_left_out_of_cost_and_model_alike():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Conv2d(4, 2, 1)
    )
    x, plan = torch.zeros(1, 3, 8, 8), BitPlan.uniform(4, 4)
    assert [c.name for c in model_cost(model, plan, x).layers] == ["0", "2"]
    q = quantized_copy(model, plan, x)
    assert [n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)] == ["0", "2"]
    assert type(q[1]) is nn.ConvTranspose2d


# -- the cost model counts what quantized_copy builds, for every model the project knows ---------------

BIG = 2_000_000  # parameters above which the forward check is skipped (ImageNet models: seconds each)


def _mixed_plan(layers, protocol) -> BitPlan:
    """Every layer its own bits, every fourth left in float; the protocol's first/last pins on top."""
    n = len(ALLOWED_BITS)
    rules = {i.name: {"w": ALLOWED_BITS[(5 * k) % n], "a": ALLOWED_BITS[(k + 2) % n]}
             for k, i in enumerate(layers) if k % 4 != 3}  # fmt: skip
    if protocol.first_last_bits:
        rules |= {name: {"w": 8, "a": 8} for name in first_last_names(layers)}
    return BitPlan(rules)


@pytest.fixture
def isolated_cache(shared_cache, monkeypatch):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(shared_cache))  # digits_cnn trains once per session
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("name", [*list_models(), HELPER])
def test_cost_counts_what_quantize_builds(isolated_cache, one_thread, name, protocol):
    bundle = create_model(name, **({"input_size": 16} if name == HELPER else {}))
    x, proto = bundle.preprocess.example_input(), PROTOCOLS[protocol]
    plan = _mixed_plan(trace_layers(bundle.model, x), proto)
    cost = model_cost(bundle.model, plan, x, proto.config.quantize_model_input)
    q = quantized_copy(bundle.model, plan, x, proto.config)
    built = {n: m for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)}
    assert set(built) == {c.name for c in cost.layers if c.w_bits < 32}
    for c in cost.layers:
        layer = built.get(c.name)
        if layer is None:
            assert c.a_bits == 32 and not isinstance(q.get_submodule(c.name), QUANT_LAYERS)
            continue
        assert (layer.w_bits, layer.a_bits or 32) == (c.w_bits, c.a_bits), c
        assert layer.weight.numel() == c.params
    if sum(p.numel() for p in q.parameters()) > BIG:
        return
    called = set()  # and every quantizer is on the forward path
    handles = [m.register_forward_hook(lambda m, i, o: called.add(id(m))) for m in q.modules()]
    try:
        with torch.no_grad():
            q(x)
    finally:
        for h in handles:
            h.remove()
    for name, layer in built.items():
        assert id(layer.weight_quant) in called, name
        assert layer.act_quant is None or id(layer.act_quant) in called, name
