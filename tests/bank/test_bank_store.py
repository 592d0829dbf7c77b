"""The bounded sample store behind a buffer actor: capacity, FIFO eviction, uniform sampling, spills."""

from __future__ import annotations

import pytest
import torch

from dfq_search.bank import Samples, SampleStore
from dfq_search.errors import DfqError

SHAPE = (3, 4, 4)


def chunk(first_step: int, n: int, name: str = "g") -> Samples:
    steps = torch.arange(first_step, first_step + n)
    x = steps.float().view(-1, 1, 1, 1).expand(n, *SHAPE).clone()  # pixel value = step: rows traceable
    return Samples(x, steps % 10, steps, torch.randn(n, 10), name)


def test_capacity_and_fifo_eviction_keep_the_newest():
    store = SampleStore(10, SHAPE, 10)
    assert store.add(chunk(0, 6)) == 0
    assert store.add(chunk(6, 6)) == 2
    assert store.filled == 10 and store.evicted == 2 and store.added == 12
    assert sorted(store.step.tolist()) == list(range(2, 12))
    assert store.add(chunk(12, 25)) == 25 - 10 + 10  # 10 held evicted, 15 of the chunk never held
    assert sorted(store.step.tolist()) == list(range(27, 37))
    held = store.rows(torch.arange(10))
    assert torch.equal(held.x[:, 0, 0, 0].float(), held.step.float())  # rows stay aligned in the ring


def test_sampling_is_uniform_without_replacement_and_tagged():
    store = SampleStore(50, SHAPE, 10)
    store.add(chunk(0, 30, "a"))
    store.add(chunk(30, 20, "b"))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    for _ in range(400):
        b = store.sample(25, gen)
        assert len(set(b.step.tolist())) == 25  # no repeats within a batch
        assert all((g == "a") == (s < 30) for g, s in zip(b.generator, b.step.tolist(), strict=True))
        counts += torch.bincount(b.step, minlength=50)
    expected = 400 * 25 / 50
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 90  # 49 degrees of freedom: p < 1e-3 beyond ~86; a biased draw lands far above
    assert store.stats()["served"] == 400 * 25 and store.stats()["held_per_generator"] == {"a": 30, "b": 20}
    assert len(store.sample(80, gen)) == 80  # more than held: with replacement


def test_empty_store_and_bad_capacity_refused_and_spill_once():
    with pytest.raises(DfqError, match="capacity"):
        SampleStore(0, SHAPE, 10)
    store = SampleStore(8, SHAPE, 10)
    with pytest.raises(DfqError, match="empty"):
        store.sample(1, torch.Generator())
    store.add(chunk(0, 3, "a"), "hash-a")
    store.add(chunk(3, 2, "b"), "hash-b", spilled=True)  # e.g. loaded from a bank
    parts = store.take_unspilled()
    assert [(n, h, len(s)) for n, h, s in parts] == [("a", "hash-a", 3)]
    assert store.take_unspilled() == []
