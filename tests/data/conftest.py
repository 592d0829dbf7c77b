"""Every test here uses the session's cache dir, never the user's ~/.cache/dfq_search."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(shared_cache))
