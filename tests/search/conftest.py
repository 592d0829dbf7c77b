"""Shared helpers of the search tests: traced tiny models, spaces from dicts, one thread per test."""

from __future__ import annotations

import pytest

from dfq_search.models import create_model
from dfq_search.quant import trace_layers


@pytest.fixture(scope="session")
def layers_of():
    """``layers_of(model_name)``: the traced layers of a tiny model (cached)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            bundle = create_model(name)
            cache[name] = trace_layers(bundle.model, bundle.preprocess.example_input())
        return cache[name]

    return get


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _quiet_optuna():
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(before)
