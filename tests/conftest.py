"""Shared fixtures: the reference data (skipped when absent) and a session-wide cache dir."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads spin by default; on a small, shared machine that slows torch many-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

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
