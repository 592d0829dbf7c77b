"""A tiny BN model P with non-trivial running statistics, its "real" data, and one thread per test."""

from __future__ import annotations

import pytest
import torch

from dfq_search.models import create_model


@pytest.fixture(scope="module")
def tiny_p():
    bundle = create_model("tiny_cnn")
    model, shape = bundle.model, bundle.preprocess.shape
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(0.6 * torch.randn(32, *shape, generator=gen) + 0.3)  # P's "real data"
        model.head[-1].weight.mul_(20.0)  # confident logits, as a trained P has: quantization shows
    return model.eval(), shape


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
