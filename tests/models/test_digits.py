"""The embedded default: digits_cnn trains once into the cache, then loads from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfq_search.data import load_digits_split
from dfq_search.errors import DfqError
from dfq_search.evaluate import evaluate
from dfq_search.models import create_model
from dfq_search.models import digits as digits_module


def test_trains_once_then_loads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(tmp_path))
    bundle = create_model("digits_cnn")
    assert (tmp_path / "weights" / digits_module.WEIGHTS_NAME).is_file()
    assert bundle.preprocess.shape == (1, 8, 8)
    result = evaluate(bundle.model, load_digits_split("test"), bundle.preprocess)
    assert result.n == 540 and result.top1 >= 95.0

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the weights are cached")

    monkeypatch.setattr(digits_module, "train_digits_cnn", no_training)
    again = create_model("digits_cnn").model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in bundle.model.state_dict().items())


def test_training_is_reproducible():
    a = digits_module.train_digits_cnn(epochs=1).state_dict()
    b = digits_module.train_digits_cnn(epochs=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_head_needs_weights():
    with pytest.raises(DfqError, match="default weights have 10 classes"):
        create_model("digits_cnn", num_classes=5)
