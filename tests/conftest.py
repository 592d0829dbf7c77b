"""Shared fixtures: the reference data (skipped when absent) and a session-wide cache dir."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads spin by default; on a small, shared machine that slows torch many-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DFQ_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $DFQ_SHARED_DATA); tests that need it skip when it is absent."""
    if not (SHARED_DATA / "weights").is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (set DFQ_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache dir for the whole test session: the embedded default model trains once."""
    return tmp_path_factory.mktemp("dfq_cache")


def _with_running_stats(model: torch.nn.Module, shape: tuple[int, ...], seed: int = 0) -> torch.nn.Module:
    """Set every BN's running statistics to those of shifted, scaled noise (cumulative average)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(0.6 * torch.randn(32, *shape, generator=gen) + 0.3)  # P's "real data"
    return model.eval()


@pytest.fixture(scope="session")
def with_running_stats():
    """A function giving a tiny model BN statistics other than the default (0, 1), so BN losses have a
    target: ``with_running_stats(model, shape, seed=0)``."""
    return _with_running_stats


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
