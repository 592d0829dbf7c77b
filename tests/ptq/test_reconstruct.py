"""Reconstruction: a unit's error falls below round-to-nearest; a merged pair is one optimisation."""

from __future__ import annotations

import pytest
import torch

from dfq_search.ptq import PTQConfig, ReconConfig, find_units, reconstruct_
from dfq_search.ptq.calibrate import calibrate_ranges_
from dfq_search.ptq.reconstruct import qdrop, reconstruct_chain_
from dfq_search.ptq.units import capture
from dfq_search.quant import PROTOCOLS, ActQuantizer, quantized_copy

FAST = ReconConfig(iters=150, batch_size=32, lr=1e-2)


def _q(tiny, batches, ptq_plan, w=2, a=4):
    q = quantized_copy(tiny.model, ptq_plan(tiny, w, a), batches[0][:1], PROTOCOLS["ptq"].config)
    calibrate_ranges_(q, batches, "mse")
    return q


def test_reconstruction_beats_round_to_nearest_on_a_unit(tiny, batches, ptq_plan):
    q = _q(tiny, batches, ptq_plan)
    x = capture(q, "block1", batches, "input")
    y = capture(tiny.model, "block1", batches, "output")
    rec = reconstruct_chain_([q.block1], ["block1"], x, y, FAST)
    assert rec.loss_after < 0.7 * rec.loss_before
    # the result is hard-rounded: every weight of the block lies on its quantizer's grid
    for layer in (q.block1.body[0][0], q.block1.body[1][0]):
        torch.testing.assert_close(layer.weight_quant.quantize(layer.weight), layer.weight.detach())


def test_a_merged_pair_is_optimised_as_one_unit(tiny, batches, ptq_plan, monkeypatch):
    q = _q(tiny, batches, ptq_plan)
    units = find_units(q, batches[0][:1])
    made = []
    real_adam = torch.optim.Adam

    def spy(groups, *args, **kwargs):
        made.append(sum(p.numel() for g in groups for p in g["params"]))
        return real_adam(groups, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    records = reconstruct_(q, tiny.model, batches, units, [[0], [1, 2], [3]], ReconConfig(iters=5))
    assert [r.units for r in records] == [("stem.0",), ("block1", "block2"), ("head.2",)]
    weights = sum(q.get_submodule(n).weight.numel() for n in units[1].layers + units[2].layers)
    acts = sum(
        1 for u in ("block1", "block2") for m in q.get_submodule(u).modules() if isinstance(m, ActQuantizer)
    )
    assert made[1] == weights + acts  # one optimiser over every V and step size of both blocks


def test_qdrop_keeps_float_values_with_its_probability():
    quant = ActQuantizer(2)
    quant.set_range(0.0, 1.0)
    x = torch.rand(10000) * 0.3
    gen = torch.Generator().manual_seed(0)
    with qdrop([quant], 0.5, gen):
        out = quant(x)
    kept = (out == x).float().mean()
    assert 0.45 < kept < 0.55
    assert torch.equal(quant(x), quant(x))  # hook removed


def test_pipeline_config_rejects_unknown_keys():
    import pytest

    from dfq_search.errors import DfqError

    with pytest.raises(DfqError, match="did you mean 'iters'"):
        ReconConfig.from_dict({"iter": 10})
    cfg = PTQConfig.from_dict({"modcap_k": 2, "recon": {"iters": 7}})
    assert cfg.recon.iters == 7 and PTQConfig.from_dict(cfg.to_dict()) == cfg


def test_a_fed_group_starts_from_the_stored_outputs_not_new_captures(tiny, batches, ptq_plan, monkeypatch):
    """Units that feed the next one pass their stored input and target on (no prefix is rerun), and
    the reconstruction is the one that captures from the whole models."""
    import copy
    import dataclasses

    from dfq_search.ptq import pipeline

    q = _q(tiny, batches, ptq_plan)
    units = find_units(q, batches[0][:1])
    assert [u.feeds_next for u in units] == [False, True, True, False]
    cut = [dataclasses.replace(u, feeds_next=False) for u in units]
    calls = []
    real = pipeline.capture
    monkeypatch.setattr(pipeline, "capture", lambda m, u, d, w: calls.append(u.name) or real(m, u, d, w))
    groups = [[0], [1], [2], [3]]
    q_cut = copy.deepcopy(q)
    fed = reconstruct_(q, tiny.model, batches, units, groups, ReconConfig(iters=5))
    assert calls == ["stem.0", "stem.0", "block1", "block1"]  # block2 and head.2 carried on
    calls.clear()
    captured = reconstruct_(q_cut, tiny.model, batches, cut, groups, ReconConfig(iters=5))
    assert len(calls) == 8
    for a, b in zip(fed, captured, strict=True):
        assert a.loss_before == pytest.approx(b.loss_before, rel=1e-4, abs=1e-7)
        assert a.loss_after == pytest.approx(b.loss_after, rel=1e-4, abs=1e-7)
    for (name, w1), w2 in zip(q.state_dict().items(), q_cut.state_dict().values(), strict=True):
        if w1.is_floating_point():
            torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-5, msg=name)
