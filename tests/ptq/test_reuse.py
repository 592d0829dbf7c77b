"""Reuse of reconstructed groups across runs: what agrees is loaded, what differs is recomputed."""

from __future__ import annotations

import logging

import pytest
import torch

import dfq_search.ptq.pipeline as pipeline
from dfq_search.ptq import PTQConfig, ReconConfig, run_ptq
from dfq_search.ptq.reuse import UnitStore

CONFIG = PTQConfig(recon=ReconConfig(iters=8, batch_size=16), guard=False)


@pytest.fixture
def chains(monkeypatch):
    """The units each run actually reconstructs."""
    done = []
    real = pipeline.reconstruct_chain_

    def spy(modules, names, x, y, config):
        done.append(tuple(names))
        return real(modules, names, x, y, config)

    monkeypatch.setattr(pipeline, "reconstruct_chain_", spy)
    return done


def _plan(ptq_plan, tiny, **rules):
    return ptq_plan(tiny, 3, 4).with_rules({k: {"w": w, "a": 4} for k, w in rules.items()})


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_repeated_run_loads_every_group_and_builds_the_same_model(
    tiny, batches, ptq_plan, chains, tmp_path
):
    store, plan = UnitStore(tmp_path), _plan(ptq_plan, tiny)
    first = run_ptq(tiny.model, plan, batches, CONFIG, reuse=store)
    assert len(chains) == 4 and not any(r.reused for r in first.records)
    again = run_ptq(tiny.model, plan, batches, CONFIG, reuse=store)
    assert len(chains) == 4  # nothing reconstructed the second time
    assert store.hits == 4 and all(r.reused for r in again.records)
    assert [r.loss_after for r in again.records] == [r.loss_after for r in first.records]
    _same(_state(again.model), _state(first.model))
    assert again.unit_errors == pytest.approx(first.unit_errors)


def test_only_the_groups_before_a_change_are_reused(tiny, batches, ptq_plan, chains, tmp_path):
    store = UnitStore(tmp_path)
    run_ptq(tiny.model, _plan(ptq_plan, tiny), batches, CONFIG, reuse=store)
    chains.clear()
    late = _plan(ptq_plan, tiny, **{"block2.body.1.0": 2})  # a layer of the third unit
    reused = run_ptq(tiny.model, late, batches, CONFIG, reuse=store)
    assert chains == [("block2",), ("head.2",)]  # stem and block1 were loaded
    fresh = run_ptq(tiny.model, late, batches, CONFIG)  # no store: the same model
    _same(_state(reused.model), _state(fresh.model))

    chains.clear()
    run_ptq(tiny.model, _plan(ptq_plan, tiny, **{"block1.body.0.0": 4}), batches, CONFIG, reuse=store)
    assert chains == [("block1",), ("block2",), ("head.2",)]  # only the stem comes before


@pytest.mark.parametrize("change", ["data", "seed", "steps"])
def test_other_data_or_settings_reuse_nothing(tiny, batches, ptq_plan, chains, tmp_path, change):
    store, plan = UnitStore(tmp_path), _plan(ptq_plan, tiny)
    run_ptq(tiny.model, plan, batches, CONFIG, reuse=store)
    chains.clear()
    data = [b + 0.01 for b in batches] if change == "data" else batches
    recon = {
        "seed": ReconConfig(iters=8, batch_size=16, seed=1),
        "steps": ReconConfig(iters=9, batch_size=16),
    }
    config = PTQConfig(recon=recon.get(change, CONFIG.recon), guard=False)
    run_ptq(tiny.model, plan, data, config, reuse=store)
    assert len(chains) == 4 and store.hits == 0


def test_a_torn_entry_is_recomputed_and_the_store_keeps_its_size(
    tiny, batches, ptq_plan, chains, tmp_path, caplog
):
    store, plan = UnitStore(tmp_path), _plan(ptq_plan, tiny)
    run_ptq(tiny.model, plan, batches, CONFIG, reuse=store)
    entries = sorted(tmp_path.glob("*.pt"))
    assert len(entries) == 4
    entries[0].write_bytes(b"torn")
    chains.clear()
    with caplog.at_level(logging.WARNING):
        run_ptq(tiny.model, plan, batches, CONFIG, reuse=store)
    assert len(chains) == 1 and store.hits == 3 and "unreadable" in caplog.text

    small = UnitStore(tmp_path / "small", max_bytes=max(f.stat().st_size for f in entries[1:]) * 2)
    run_ptq(tiny.model, plan, batches, CONFIG, reuse=small)
    assert sum(f.stat().st_size for f in (tmp_path / "small").glob("*.pt")) <= small.max_bytes
