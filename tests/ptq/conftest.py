"""Tiny models and calibration batches shared by the ptq tests."""

from __future__ import annotations

import pytest
import torch

from dfq_search.data import gaussian_batches
from dfq_search.models import create_model
from dfq_search.quant import PROTOCOLS, LayerBits, trace_layers


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny_resnet")


@pytest.fixture(scope="module")
def batches(tiny):
    return list(gaussian_batches(tiny.preprocess, 4, 32, 0))


@pytest.fixture(scope="module")
def ptq_plan():
    """``ptq_plan(bundle, w, a)``: the PTQ protocol's plan (8-bit first and last layer) at WwAa."""

    def make(bundle, w: int, a: int):
        layers = trace_layers(bundle.model, bundle.preprocess.example_input())
        return PROTOCOLS["ptq"].plan(layers, LayerBits(w, a))

    return make
