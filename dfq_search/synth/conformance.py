"""A conformance suite every sample source passes (as Optuna ships its sampler tests).

``check_source(make)``, where ``make(seed)`` builds a fresh source, asserts: the shape, dtype and label
range of ``sample``; the same seed gives the same samples and another seed other ones; a state-dict
round trip reproduces the samples; the gradient of the samples reaches the source's parameters.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from torch import nn


def _draw(source: nn.Module, seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return source.sample(batch, torch.Generator().manual_seed(seed))


def check_source(make: Callable[[int], nn.Module], batch: int = 6) -> None:
    """Assert the sample-source contract for the sources ``make(seed)`` builds (module docstring)."""
    a, b = make(0), make(0)
    x, y = _draw(a, 1, batch)
    assert x.shape == (batch, *a.image_shape) and x.dtype == torch.float32, x.shape
    assert y.shape == (batch,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < a.num_classes
    assert torch.isfinite(x).all()
    x2, y2 = _draw(b, 1, batch)
    assert torch.equal(x, x2) and torch.equal(y, y2), "same seeds must give the same samples"
    x3, _ = _draw(a, 2, batch)
    assert not torch.equal(x, x3), "another draw seed must give other samples"
    assert not torch.equal(_draw(make(5), 1, batch)[0], x), "another init seed must give another source"

    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = make(7)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(_draw(c, 1, batch)[0], x), "a state-dict round trip must reproduce the samples"

    xg, _ = a.sample(batch, torch.Generator().manual_seed(1))
    xg.square().mean().backward()
    grads = [p.grad for p in a.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reaches the source"
