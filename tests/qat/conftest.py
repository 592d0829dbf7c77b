"""A tiny BN model P with non-trivial running statistics, its "real" data, and one thread per test."""

from __future__ import annotations

import pytest
import torch

from dfq_search.models import create_model


@pytest.fixture(scope="module")
def tiny_p(with_running_stats):
    bundle = create_model("tiny_cnn")
    shape = bundle.preprocess.shape
    model = with_running_stats(bundle.model, shape)
    with torch.no_grad():
        model.head[-1].weight.mul_(20.0)  # confident logits, as a trained P has: quantization shows
    return model, shape


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield
