"""Units: discovery on every model family, links between units, capture of inputs and outputs."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfq_search.errors import DfqError
from dfq_search.models import create_model
from dfq_search.models.tiny import conv_bn
from dfq_search.ptq.modcap import candidate_pairs, check_k, named_chains
from dfq_search.ptq.units import capture, find_units, unit_names_check
from dfq_search.quant.layers import QUANTIZABLE

T, F_ = True, False
SEPARABLE = "Conv2d[dw]+BatchNorm2d+ReLU6+Conv2d+BatchNorm2d+ReLU6"
EXPECTED = {  # unit names, feeds_next
    "vgg": (["0", "3..5", "7..9", "10..12", "16"], [F_, T, T, T, F_]),
    "mobilenet_v1": (["0", "3..8", "9..14", "15..20", "23"], [F_, T, T, T, F_]),
    "gray": (["conv1", "conv2..relu2", "conv3..relu3", "fc"], [F_, T, F_, F_]),
    "efficientnet": (["0.0", "1", "2", "3", "4", "5.2"], [F_, T, T, T, T, F_]),
    "tiny_cnn": (["features.0.0", "features.1", "features.2", "head.2"], [F_, T, T, F_]),
    "tiny_resnet": (["stem.0", "block1", "block2", "head.2"], [F_, T, T, F_]),
    "tiny_mobilenet": (["stem.0", "blocks.0", "blocks.1", "last", "head.2"], [F_, T, T, T, F_]),
}


def test_units_of_each_family(family):
    units = find_units(family.model, family.batches[0][:1])
    names, feeds = EXPECTED[family.name]
    assert [u.name for u in units] == names
    assert [u.feeds_next for u in units] == feeds
    layers = [n for n, m in family.model.named_modules() if isinstance(m, QUANTIZABLE)]
    assert sorted(n for u in units for n in u.layers) == sorted(layers)  # every layer in one unit
    assert len(candidate_pairs(units)) >= 1
    assert named_chains(units, [names[1:3]])[1] == [1, 2]  # PTQConfig.merges by unit name


def test_kinds_follow_the_topology(family):
    kinds = {u.name: u.kind for u in find_units(family.model, family.batches[0][:1])}
    expected = {
        "vgg": {"0": "Conv2d", "3..5": "Conv2d+BatchNorm2d+ReLU", "7..9": "Conv2d+BatchNorm2d+ReLU"},
        "mobilenet_v1": {"3..8": SEPARABLE, "9..14": SEPARABLE, "23": "Linear"},
        "gray": {"conv2..relu2": "Conv2d+BatchNorm2d+ReLU", "conv3..relu3": "Conv2d+BatchNorm2d+ReLU"},
        "efficientnet": {"1": "MBConv", "3": "MBConv", "4": "Conv2d+BatchNorm2d+SiLU"},
        "tiny_mobilenet": {"blocks.0": "InvertedResidual", "last": "Conv2d+BatchNorm2d+ReLU6"},
    }.get(family.name, {})
    assert {n: kinds[n] for n in expected} == expected


def test_linked_units_hand_over_their_tensors(family):
    units = find_units(family.model, family.batches[0][:1])
    for a, b in itertools.pairwise(units):
        if a.feeds_next:
            out = capture(family.model, a, family.batches, "output")
            torch.testing.assert_close(out, capture(family.model, b, family.batches, "input"))


def test_pass_through_modules_run_in_the_next_unit(family):
    expected = {  # pooling, dropout, flatten between two units: inside the second, outside its name
        "vgg": {"7..9": ("6", "7", "8", "9"), "16": ("13", "14", "15", "16")},
        "gray": {"conv3..relu3": ("pool", "conv3", "bn3", "relu3")},
        "tiny_cnn": {"head.2": ("head.0", "head.1", "head.2")},
    }.get(family.name, {})
    modules = {u.name: u.modules for u in find_units(family.model, family.batches[0][:1])}
    assert {n: modules[n] for n in expected} == expected


def test_units_of_tiny_resnet(tiny):
    units = find_units(tiny.model, tiny.preprocess.example_input())
    assert units[2].layers == ("block2.body.0.0", "block2.body.1.0", "block2.shortcut.0")
    assert units[1].kind == units[2].kind == "ResidualBlock"
    assert units[3].modules == ("head.0", "head.1", "head.2")  # pooling and flatten run in the head's unit


@pytest.mark.parametrize("depth", [20, 32])
def test_units_of_cifar_resnets_are_unchanged(depth):
    bundle = create_model(f"cifar_resnet{depth}")
    units = find_units(bundle.model, bundle.preprocess.example_input())
    n = (depth - 2) // 6
    blocks = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(n)]
    assert [u.name for u in units] == ["conv1", *blocks, "linear"]
    assert [u.modules for u in units] == [(u.name,) for u in units]
    assert [u.layers for u in units] == [
        ("conv1",),
        *((f"{b}.conv1", f"{b}.conv2") for b in blocks),
        ("linear",),
    ]
    assert [u.kind for u in units] == ["Conv2d"] + ["BasicBlock"] * len(blocks) + ["Linear"]
    # blocks feed each other across stages, so (layer1.2, layer2.0) is a candidate pair
    assert [u.feeds_next for u in units] == [False] + [True] * (len(blocks) - 1) + [False, False]


class _Functional(nn.Module):
    """Attributes and F.relu: BN's output is not the next conv's input, so no unit feeds the next."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class _Untraceable(_Functional):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # control flow on a tensor value: torch.fx cannot trace it
            x = x / 2
        return self.fc(self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x)))))).mean((2, 3)))


def test_modcap_on_a_functional_forward_is_refused_with_the_reason():
    units = find_units(_Functional().eval(), torch.randn(1, 3, 8, 8))
    assert [u.name for u in units] == ["conv1", "conv2..bn2", "conv3..bn3", "fc"]
    check_k(units, 0)
    with pytest.raises(DfqError, match="F.relu") as err:
        check_k(units, 1)
    assert "nn.Sequential" in err.value.fix


def test_untraceable_forward_falls_back_to_the_module_tree_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dfq_search.ptq.links"):
        units = find_units(_Untraceable().eval(), torch.randn(1, 3, 8, 8))
    assert "torch.fx cannot trace _Untraceable.forward" in caplog.text
    assert [u.name for u in units] == ["conv1", "conv2", "conv3", "fc"]
    with pytest.raises(DfqError, match="k <= 0"):
        check_k(units, 1)


def test_module_list_loops_and_shared_activations():
    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList([conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8)])
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for stage in self.stages:
                x = stage(x)
            return self.fc(x.mean((2, 3)))

    units = find_units(Looped().eval(), torch.randn(1, 3, 8, 8))  # fx unrolls the loop
    assert [(u.name, u.feeds_next) for u in units] == [
        ("stages.0.0", False), ("stages.1", True), ("stages.2", False), ("fc", False)
    ]  # fmt: skip
    relu = nn.ReLU()  # one module object at two places: a hook could not tell its calls apart
    shared = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), relu, nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), relu,
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 4),
    )  # fmt: skip
    units = find_units(shared.eval(), torch.randn(1, 3, 8, 8))
    assert [u.name for u in units] == ["0", "3..4", "6..8", "10"]


def test_capture_input_of_next_equals_output_of_linked_unit(tiny, batches):
    out = capture(tiny.model, "block1", batches, "output")
    inp = capture(tiny.model, "block2", batches, "input")
    assert out.shape == (128, 16, 16, 16)
    torch.testing.assert_close(out, inp)


def test_unknown_unit_is_refused(tiny):
    units = find_units(tiny.model, tiny.preprocess.example_input())
    with pytest.raises(DfqError, match="block1"):
        unit_names_check(units, ["blok1"])
