"""The CIFAR ResNet: architecture, and the published-weights accuracy on the JPEG test set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dfq_search.data import load_image_folder
from dfq_search.evaluate import evaluate
from dfq_search.models import create_model
from dfq_search.models.cifar_resnet import BasicBlock, OptionAShortcut


@pytest.mark.parametrize(("depth", "params"), [(20, 269_722), (32, 464_154)])
def test_parameter_counts(depth, params):
    model = create_model(f"cifar_resnet{depth}").model
    assert sum(p.numel() for p in model.parameters()) == params  # 0.27M and 0.46M


def test_structure_and_keys():
    model = create_model("cifar_resnet20").model
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    shortcuts = [m for m in model.modules() if isinstance(m, OptionAShortcut)]
    assert len(shortcuts) == 2 and all(not list(s.parameters()) for s in shortcuts)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9 and len({id(r) for r in relus}) == len(relus)
    keys = model.state_dict().keys()
    assert {"conv1.weight", "bn1.running_mean", "layer3.2.bn2.weight", "linear.bias"} <= set(keys)


def test_option_a_shortcut_matches_the_reference_lambda():
    x = torch.randn(2, 16, 8, 8)
    ref = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8), "constant", 0)
    assert torch.equal(OptionAShortcut(8)(x), ref)


def test_random_init_is_deterministic():
    a = create_model("cifar_resnet20").model.state_dict()
    b = create_model("cifar_resnet20").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("depth", "weights", "top1"),
    [(20, "resnet20-12fca82f.th", 81.03), (32, "resnet32-d509ac18.th", 82.56)],
)
def test_pretrained_top1_on_the_jpeg_test_set(shared_data: Path, depth, weights, top1):
    bundle = create_model(f"cifar_resnet{depth}", weights=shared_data / "weights" / weights)
    data = load_image_folder(shared_data / "cifar10" / "test", bundle.preprocess)
    assert len(data) == 10_000 and data.classes[:2] == ["airplane", "automobile"]
    result = evaluate(bundle.model, data, bundle.preprocess)
    assert result.top1 == pytest.approx(top1, abs=0.05)


@pytest.mark.shared_data
def test_resnet32_weights_into_resnet20(shared_data: Path):
    from dfq_search.errors import DfqError

    with pytest.raises(DfqError, match="looks like cifar_resnet32"):
        create_model("cifar_resnet20", weights=shared_data / "weights" / "resnet32-d509ac18.th")
