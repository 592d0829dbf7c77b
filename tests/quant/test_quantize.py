import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2, resnet18

from dfq_search.errors import DfqError
from dfq_search.quant import (
    PROTOCOLS,
    BitPlan,
    LayerBits,
    QuantConv2d,
    QuantLinear,
    calibrate_,
    get_protocol,
    quantize_,
    quantized_copy,
    trace_layers,
)


class OptionABlock(nn.Module):
    """A CIFAR ResNet basic block with a parameter-free (option A) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, :: self.stride, :: self.stride]
        short = F.pad(short, (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


def option_a_resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        OptionABlock(8, 8, 1), OptionABlock(8, 16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()).item()


MODELS = {
    "option_a": (option_a_resnet, (1, 3, 16, 16)),
    "resnet18": (lambda: resnet18(num_classes=10).eval(), (1, 3, 32, 32)),
    "mobilenet_v2": (lambda: mobilenet_v2(num_classes=10).eval(), (1, 3, 32, 32)),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_layer_quantized_and_8bit_close_to_float(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    p = build()
    x = torch.randn(8, *shape[1:])
    p.train()  # BN statistics of the data, as a trained model has them
    with torch.no_grad():
        p(x)
    p.eval()
    q = quantized_copy(p, BitPlan.uniform(8, 8), shape)
    n_float = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in p.modules())
    quantized = [m for m in q.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(quantized) == n_float
    assert sum(m.act_quant is None for m in quantized) == 1  # only the layer reading the image
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in p.modules())  # P untouched
    calibrate_(q, [x])
    with torch.no_grad():
        assert sqnr_db(p(x), q(x)) > 20
        q4 = quantized_copy(p, BitPlan.uniform(4, 4), shape)
        calibrate_(q4, [x])
        assert sqnr_db(p(x), q4(x)) < sqnr_db(p(x), q(x))


def test_ptq_protocol_pins_first_and_last_layers():
    p = option_a_resnet()
    layers = trace_layers(p, torch.zeros(1, 3, 16, 16))
    plan = get_protocol("ptq").plan(layers, LayerBits(4, 4))
    bits = plan.resolve([i.name for i in layers])
    assert bits["0"] == LayerBits(8, 8) and bits["7"] == LayerBits(8, 8)
    assert bits["3.conv1"] == LayerBits(4, 4)
    assert PROTOCOLS["generative"].plan(layers, LayerBits(4, 4)) == BitPlan.uniform(4, 4)
    with pytest.raises(DfqError, match="unknown protocol.*generative"):
        get_protocol("genrative")


def test_quantized_model_trains_weights_and_step_sizes():
    p = option_a_resnet()
    q = quantized_copy(p, BitPlan.uniform(4, 4), (1, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    calibrate_(q, [x])
    q(x).pow(2).mean().backward()
    conv = q[3].conv2
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.act_quant.scale.grad is not None


def test_state_dict_round_trip_reproduces_outputs():
    p = option_a_resnet()
    x = torch.randn(4, 3, 16, 16)
    q = quantized_copy(p, BitPlan.uniform(3, 3), (1, 3, 16, 16), PROTOCOLS["ptq"].config)
    calibrate_(q, [x])
    q2 = quantized_copy(p, BitPlan.uniform(3, 3), (1, 3, 16, 16), PROTOCOLS["ptq"].config)
    q2.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_refusals():
    p = option_a_resnet()
    q = quantize_(p, BitPlan.uniform(4, 4), (1, 3, 16, 16))
    with pytest.raises(DfqError, match="already quantized"):
        quantize_(q, BitPlan.uniform(4, 4), (1, 3, 16, 16))
    with pytest.raises(DfqError, match="lacks"):
        quantized_copy(option_a_resnet(), BitPlan({"conv9": {"w": 4, "a": 4}}), (1, 3, 16, 16))
    with pytest.raises(DfqError, match="at least one batch"):
        calibrate_(quantized_copy(option_a_resnet(), BitPlan.uniform(4, 4), (1, 3, 16, 16)), [])
