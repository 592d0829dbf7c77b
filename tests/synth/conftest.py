"""Tiny BN models whose running statistics are not the default (0, 1), so BN losses have a target."""

from __future__ import annotations

import pytest
import torch

from dfq_search.models import create_model


def with_running_stats(model: torch.nn.Module, shape: tuple[int, ...], seed: int = 0) -> torch.nn.Module:
    """Set every BN's running statistics to those of shifted, scaled noise (cumulative average)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(0.6 * torch.randn(32, *shape, generator=gen) + 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    """tiny_cnn (16x16 RGB, 10 classes) with non-trivial BN statistics, and its input shape."""
    bundle = create_model("tiny_cnn")
    return with_running_stats(bundle.model, bundle.preprocess.shape), bundle.preprocess


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
