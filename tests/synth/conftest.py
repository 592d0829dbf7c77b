"""Tiny BN models whose running statistics are not the default (0, 1), so BN losses have a target."""

from __future__ import annotations

import pytest

from dfq_search.models import create_model


@pytest.fixture(scope="module")
def tiny(with_running_stats):
    """tiny_cnn (16x16 RGB, 10 classes) with non-trivial BN statistics, and its input shape."""
    bundle = create_model("tiny_cnn")
    return with_running_stats(bundle.model, bundle.preprocess.shape), bundle.preprocess


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield
