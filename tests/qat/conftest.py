"""A tiny BN model P with non-trivial running statistics, its "real" data, and one thread per test."""

from __future__ import annotations

import pytest
import torch

from dfq_search.models import create_model


def shifted_noise(n: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """The distribution that set P's BN statistics: P's stand-in for real data."""
    return 0.6 * torch.randn(n, *shape, generator=gen) + 0.3


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
            model(shifted_noise(32, shape, gen))
        model.head[-1].weight.mul_(20.0)  # confident logits, as a trained P has: quantization shows
    return model.eval(), shape


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
