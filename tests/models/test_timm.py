"""timm models by name (``timm:<name>``): built offline, preprocessing from timm's config, quantized as
the plan says (tf_efficientnet_lite0's convolutions are timm's Conv2dSame, a Conv2d subclass with its
own forward), a model without BatchNorm refused where data-free samples would need it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dfq_search.checkpoint import load_quantized, save_quantized
from dfq_search.data.image_data import gaussian_batches
from dfq_search.errors import DfqError
from dfq_search.models import create_model
from dfq_search.quant import PROTOCOLS, BitPlan, QuantSubclass, calibrate_, model_cost, quantized_copy
from dfq_search.synth.bn import require_bn_for_samples

timm = pytest.importorskip("timm", reason="timm models need the [timm] extra (in [test])")


def test_preprocessing_comes_from_timms_config_and_the_flags():
    bundle = create_model("timm:resnet18", num_classes=10)
    assert (bundle.preprocess.input_size, bundle.preprocess.resize) == (224, 236)  # crop_pct 0.95
    small = create_model("timm:tf_efficientnet_lite0", num_classes=10, input_size=32)
    assert small.preprocess.shape == (3, 32, 32)
    assert small.model(small.preprocess.example_input(2)).shape == (2, 10)
    with pytest.raises(DfqError, match=r"unknown timm model \(did you mean 'resnet18'.*got 'resnet1'"):
        create_model("timm:resnet1")


def test_a_same_padding_model_is_quantized_layer_for_layer_and_round_trips(tmp_path: Path):
    bundle = create_model("timm:tf_efficientnet_lite0", num_classes=10, input_size=32)
    same = [n for n, m in bundle.model.named_modules() if type(m).__name__ == "Conv2dSame"]
    plan, config = BitPlan.uniform(4, 4), PROTOCOLS["ptq"].config
    example = bundle.preprocess.example_input()
    q = quantized_copy(bundle.model, plan, example, config)
    assert len(same) == 5 and all(isinstance(q.get_submodule(n), QuantSubclass) for n in same)
    cost = model_cost(bundle.model, plan, example)
    assert all(c.w_bits == 4 for c in cost.layers)  # every layer counted at 4 bits is one built at 4
    calibrate_(q, gaussian_batches(bundle.preprocess, 2, 8, 0))
    path = save_quantized(tmp_path / "q.pt", q, bundle.name, 10, plan, config, bundle.preprocess)
    again, meta = load_quantized(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), q.eval()(x)) and meta["preprocess"].input_size == 32


def test_a_model_without_batchnorm_is_refused_for_synthesized_samples():
    bundle = create_model("timm:convnext_atto", num_classes=10, input_size=32)
    with pytest.raises(DfqError, match=r"no BatchNorm for direct samples.*LayerNorm2d.*--samples real:DIR"):
        require_bn_for_samples(bundle.model, bundle.name, "direct")
    require_bn_for_samples(bundle.model, bundle.name, "gaussian")  # nothing to match: allowed


def test_without_timm_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(DfqError, match=r"need the timm package.*\[timm\]"):
        create_model("timm:resnet18")
