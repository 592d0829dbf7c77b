"""Every sample source passes the conformance suite; generator shapes and bad input."""

from __future__ import annotations

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.synth.conformance import check_source
from dfq_search.synth.generators import LargeKernelAttention, build_source

CASES = {
    "gdfq-cifar": ("gdfq", (3, 16, 16), {}),
    "gdfq-cbn": ("gdfq", (3, 32, 32), {"conditional_bn": True, "upsamples": 3}),
    "lrq": ("lrq", (3, 16, 16), {}),
    "lrq-stage0": ("lrq", (1, 8, 8), {"lka_after": (0,), "lka_kernels": (3, 5), "lka_dilation": 2}),
    "pixels": ("pixels", (3, 16, 16), {"n": 20}),
}


@pytest.mark.parametrize("case", CASES)
def test_conformance(case) -> None:
    name, shape, kwargs = CASES[case]
    check_source(lambda seed: build_source(name, 7, shape, seed=seed, **kwargs))


def test_lrq_has_attention_where_asked() -> None:
    g = build_source("lrq", 10, (3, 32, 32), lka_after=(0, 2))
    assert sorted(g.lka) == ["0", "2"]
    assert all(isinstance(m, LargeKernelAttention) for m in g.lka.values())
    assert len(build_source("gdfq", 10, (3, 32, 32)).lka) == 0
    lka = LargeKernelAttention(4, 5, 7, 3)
    x = torch.randn(2, 4, 9, 9)
    assert lka(x).shape == x.shape


def test_gdfq_output_is_normalised_per_channel() -> None:
    g = build_source("gdfq", 10, (3, 16, 16)).train()
    x, _ = g.sample(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "match"),
    [
        ("gdfx", (3, 32, 32), {}, "did you mean 'gdfq'"),
        ("gdfq", (3, 30, 30), {}, "image shape"),
        ("lrq", (3, 32, 32), {"lka_after": (3,)}, "lka_after"),
        ("lrq", (3, 32, 32), {"lka_kernels": (4, 7)}, "lka_kernels"),
    ],
)
def test_bad_generator_input(name, shape, kwargs, match) -> None:
    with pytest.raises(DfqError, match=match):
        build_source(name, 10, shape, **kwargs)
