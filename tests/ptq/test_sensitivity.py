"""ZeroQ sensitivity and the DP bit allocation (checked against brute force)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.models import create_model
from dfq_search.ptq.sensitivity import allocate_bits, sensitivity_plan, zeroq_sensitivity


def _brute(sens, params, budget):
    names = list(sens)
    best = None
    for combo in itertools.product(*(sorted(sens[n]) for n in names)):
        size = sum(params[n] * k for n, k in zip(names, combo, strict=True))
        cost = sum(sens[n][k] for n, k in zip(names, combo, strict=True))
        if size <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, dict(zip(names, combo, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_dp_allocation_is_optimal(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(6)]
    params = {n: rng.randint(10, 200) for n in names}
    sens = {n: {k: rng.random() * 2.0 ** (-k) * rng.randint(1, 10) for k in (2, 3, 4, 8)} for n in names}
    budget = 4 * sum(params.values())
    got = allocate_bits(sens, params, budget)
    cost, _ = _brute(sens, params, budget)
    assert sum(params[n] * k for n, k in got.items()) <= budget
    assert sum(sens[n][k] for n, k in got.items()) == pytest.approx(cost)


def test_budget_too_small_is_refused():
    with pytest.raises(DfqError, match="budget"):
        allocate_bits({"a": {2: 1.0, 4: 0.0}}, {"a": 10}, 19)


def test_sensitivity_falls_with_bits_and_leaves_p_untouched():
    bundle = create_model("tiny_cnn")
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    batches = [torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))]
    sens = zeroq_sensitivity(bundle.model, batches, bits=(2, 4, 8))
    assert set(sens) == {"features.0.0", "features.1.0", "features.2.0", "head.2"}
    for omega in sens.values():
        assert omega[2] > omega[4] > omega[8] >= 0
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())
    plan, _ = sensitivity_plan(bundle.model, batches, 4.0, bits=(2, 4, 8), pinned={"head.2": 8})
    resolved = plan.resolve(list(sens))
    assert resolved["head.2"].w == 8 and resolved["head.2"].a == 8
    params = {n: bundle.model.get_submodule(n).weight.numel() for n in sens}
    assert sum(params[n] * b.w for n, b in resolved.items()) <= 4.0 * sum(params.values())
