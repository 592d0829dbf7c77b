"""Units: discovery on tiny and CIFAR models, links between units, capture of inputs and outputs."""

from __future__ import annotations

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.models import create_model
from dfq_search.ptq.units import capture, find_units, unit_names_check


def test_units_of_tiny_resnet(tiny):
    units = find_units(tiny.model, tiny.preprocess.example_input())
    assert [u.name for u in units] == ["stem.0", "block1", "block2", "head.2"]
    assert [u.feeds_next for u in units] == [False, True, False, False]
    assert units[2].layers == ("block2.body.0.0", "block2.body.1.0", "block2.shortcut.0")
    assert units[1].kind == units[2].kind == "ResidualBlock"


def test_units_of_cifar_resnet20():
    bundle = create_model("cifar_resnet20")
    units = find_units(bundle.model, bundle.preprocess.example_input())
    names = [u.name for u in units]
    assert names == ["conv1"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)] + ["linear"]
    # blocks feed each other across stages, so (layer1.2, layer2.0) is a candidate pair
    assert [u.feeds_next for u in units] == [False] + [True] * 8 + [False, False]


def test_capture_input_of_next_equals_output_of_linked_unit(tiny, batches):
    out = capture(tiny.model, "block1", batches, "output")
    inp = capture(tiny.model, "block2", batches, "input")
    assert out.shape == (128, 16, 16, 16)
    torch.testing.assert_close(out, inp)


def test_unknown_unit_is_refused(tiny):
    units = find_units(tiny.model, tiny.preprocess.example_input())
    with pytest.raises(DfqError, match="block1"):
        unit_names_check(units, ["blok1"])
