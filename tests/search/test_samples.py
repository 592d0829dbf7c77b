"""The campaign samples' cache key: what makes the images is in it, what only another source reads is not."""

from __future__ import annotations

from dataclasses import replace

import torch

from dfq_search.models import create_model
from dfq_search.search.samples import cache_key
from dfq_search.search.space import Samples
from dfq_search.synth.direct import DirectConfig


def test_the_key_follows_the_settings_the_source_reads() -> None:
    bundle = create_model("tiny_cnn")
    base = Samples(source="direct", calibration=8, heldout=4, seed=0)
    key = cache_key(bundle, base)
    # generator-only settings do not make direct-synthesis images: same key, the cache is kept
    assert cache_key(bundle, replace(base, generators=("dsg",), generator_steps=7, keep_after=3)) == key
    # everything that changes the images changes the key
    changes = [{"seed": 1}, {"calibration": 9}, {"heldout": 5}, {"direct": DirectConfig(iterations=7)},
               {"source": "gaussian"}]  # fmt: skip
    for change in changes:
        changed = replace(base, **change)
        assert cache_key(bundle, changed) != key
    other = create_model("tiny_cnn")
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    assert cache_key(other, base) != key
