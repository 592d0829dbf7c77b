"""HAWQ-V3's integer linear program (SciPy's milp) against brute force and the exact DP."""

from __future__ import annotations

import itertools
import random

import pytest

from dfq_search.errors import DfqError
from dfq_search.ptq.ilp import allocate_ilp
from dfq_search.ptq.sensitivity import allocate_bits


def _instance(seed: int):
    rng = random.Random(seed)
    params = {f"l{i}": rng.randint(10, 400) for i in range(5)}
    macs = {n: rng.randint(100, 5000) for n in params}
    cost = {n: {k: rng.random() * (9 - k) for k in (2, 4, 8)} for n in params}
    use = {n: {k: (params[n] * k, macs[n] * k * 4) for k in (2, 4, 8)} for n in params}
    size = 0.5 * sum(params[n] * 8 for n in params)
    bops = 0.45 * sum(macs[n] * 8 * 4 for n in params)
    return params, cost, use, (size, bops)


def _brute(cost, use, limits):
    names, best = list(cost), None
    for ks in itertools.product(*(cost[n] for n in names)):
        if all(
            sum(use[n][k][j] for n, k in zip(names, ks, strict=True)) <= lim for j, lim in enumerate(limits)
        ):
            total = sum(cost[n][k] for n, k in zip(names, ks, strict=True))
            best = total if best is None or total < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
def test_the_ilp_finds_the_brute_force_optimum_under_two_limits(seed):
    _, cost, use, limits = _instance(seed)
    chosen = allocate_ilp(cost, use, limits)
    assert all(sum(use[n][chosen[n]][j] for n in cost) <= lim + 1e-6 for j, lim in enumerate(limits))
    assert sum(cost[n][chosen[n]] for n in cost) == pytest.approx(_brute(cost, use, limits), abs=1e-9)


def test_with_one_size_limit_it_agrees_with_the_dp():
    params, cost, use, (size, _) = _instance(7)
    ilp = allocate_ilp(cost, {n: {k: v[:1] for k, v in u.items()} for n, u in use.items()}, [size])
    dp = allocate_bits(cost, params, size)
    assert sum(cost[n][ilp[n]] for n in cost) == pytest.approx(sum(cost[n][dp[n]] for n in cost), abs=1e-9)


def test_limits_no_assignment_meets_are_refused():
    _, cost, use, _ = _instance(0)
    with pytest.raises(DfqError, match="bit allocation"):
        allocate_ilp(cost, use, [1.0, 1.0])
