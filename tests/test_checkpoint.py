"""Quantized checkpoints: a round trip gives the same model, a user model keeps its preprocessing."""

from __future__ import annotations

from pathlib import Path

import torch

from dfq_search.checkpoint import load_quantized, save_quantized
from dfq_search.data.image_data import gaussian_batches
from dfq_search.models import create_model
from dfq_search.quant import PROTOCOLS, BitPlan, calibrate_, quantized_copy


def _quantized(bundle):
    config = PROTOCOLS["ptq"].config
    q = quantized_copy(bundle.model, BitPlan.uniform(4, 4), bundle.preprocess.example_input(), config)
    calibrate_(q, gaussian_batches(bundle.preprocess, 2, 16, 0))
    return q, config


def test_round_trip_gives_the_same_outputs(tmp_path: Path):
    bundle = create_model("tiny_cnn")
    q, config = _quantized(bundle)
    path = save_quantized(
        tmp_path / "q.pt", q, bundle.name, bundle.num_classes, BitPlan.uniform(4, 4), config
    )
    again, meta = load_quantized(path)
    x = bundle.preprocess.example_input(4)
    assert torch.equal(q.eval()(x), again(x)) and meta["plan"] == BitPlan.uniform(4, 4)


def test_a_user_model_is_rebuilt_with_its_preprocessing(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "models"))
    bundle = create_model(
        "dfq_user_model_helper:build", num_classes=3, input_size=12, mean=(0.5,), std=(0.25,)
    )
    q, config = _quantized(bundle)
    plan = BitPlan.uniform(4, 4)
    path = save_quantized(tmp_path / "q.pt", q, bundle.name, 3, plan, config, bundle.preprocess)
    again, meta = load_quantized(path)
    assert meta["preprocess"] == bundle.preprocess  # input size and normalization, not the defaults
    x = bundle.preprocess.example_input(2)
    assert torch.equal(q.eval()(x), again(x))
