"""ModCap: capacities, differentials, top-k selection, chains, bad k."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfq_search.errors import DfqError
from dfq_search.ptq import PTQConfig, ReconConfig, run_ptq
from dfq_search.ptq.modcap import (
    candidate_pairs,
    chains,
    check_k,
    data_capacity,
    data_free_capacity,
    differentials,
    modcap_chains,
    select_pairs,
)
from dfq_search.ptq.units import find_units
from dfq_search.quant import PROTOCOLS, BitPlan, LayerBits, quantized_copy, trace_layers


class Blk(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = (
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def _gapped():
    """Five alike units whose parameter counts are 216, 576, 2304, 9216, 9216 (gaps at known pairs)."""
    torch.manual_seed(0)
    model = nn.Sequential(Blk(3, 8), Blk(8, 8), Blk(8, 32), Blk(32, 32), Blk(32, 32)).eval()
    q = quantized_copy(model, BitPlan.uniform(4, 4), (1, 3, 8, 8))
    return q, find_units(q, torch.randn(1, 3, 8, 8))


def test_data_free_capacity_follows_params_bits_and_stride():
    q, units = _gapped()
    assert data_free_capacity(q, units) == [4 * 216, 4 * 576, 4 * 2304, 4 * 9216, 4 * 9216]
    model = nn.Sequential(Blk(3, 8), Blk(8, 8, stride=2)).eval()
    plan = BitPlan({"_default": {"w": 4, "a": 4}, "1.conv": {"w": 2, "a": 4}})
    q2 = quantized_copy(model, plan, (1, 3, 8, 8))
    u2 = find_units(q2, torch.randn(1, 3, 8, 8))
    assert data_free_capacity(q2, u2, stride_factor=0.25) == [4 * 216, 0.25 * 2 * 576]


def test_selection_picks_the_largest_differentials():
    q, units = _gapped()
    caps = data_free_capacity(q, units)
    assert candidate_pairs(units) == [0, 1, 2, 3]
    assert differentials(caps, units)[2] == 4 * (2304 - 9216)
    groups, _ = modcap_chains(units, caps, 1)
    assert groups == [[0], [1], [2, 3], [4]]
    groups, _ = modcap_chains(units, caps, 2)  # next largest gap (1, 2) chains into three units
    assert groups == [[0], [1, 2, 3], [4]]
    groups, _ = modcap_chains(units, caps, 2, max_chain=2)  # (1, 2) would make three: skip to (0, 1)
    assert groups == [[0, 1], [2, 3], [4]]


def test_data_capacity_ranks_error_jumps():
    errors = [0.01, 0.02, 0.30, 0.31]
    caps = data_capacity(errors)
    assert select_pairs({0: caps[0] - caps[1], 1: caps[1] - caps[2], 2: caps[2] - caps[3]}, 1, 4) == [1]


def test_chains_partition():
    assert chains(5, []) == [[0], [1], [2], [3], [4]]
    assert chains(5, [0, 3]) == [[0, 1], [2], [3, 4]]


def test_k_larger_than_pairs_is_refused():
    _, units = _gapped()
    check_k(units, 4)
    with pytest.raises(DfqError, match="k <= 4"):
        check_k(units, 5)
    with pytest.raises(DfqError, match="lower k"):
        select_pairs({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, 4, 5, max_chain=2)


def test_modcap_merges_an_alike_pair_and_reconstruction_helps_on_every_family(family):
    example = family.batches[0][:1]
    plan = PROTOCOLS["ptq"].plan(trace_layers(family.model, example), LayerBits(3, 4))
    fast = ReconConfig(iters=60, batch_size=16, lr=1e-2)
    res = run_ptq(family.model, plan, family.batches, PTQConfig(modcap_k=1, recon=fast))
    merged = [g for g in res.groups if len(g) > 1]
    assert len(merged) == 1 and len(merged[0]) == 2
    kinds = {u.name: u.kind for u in res.units}
    assert kinds[merged[0][0]] == kinds[merged[0][1]]
    assert len(res.records) == len(res.units) - 1
    joint = next(r for r in res.records if len(r.units) == 2)
    assert joint.loss_after < 0.8 * joint.loss_before
    # 8-bit first and last layers barely move (their rounding is already close to the best one)
    assert sum(r.loss_after for r in res.records) < sum(r.loss_before for r in res.records)
