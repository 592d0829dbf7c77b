"""Shared fixtures: the reference data (skipped when absent) and a session-wide cache dir."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads spin by default; on a small, shared machine that slows torch many-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray runs its workers at nice 15, so beside any other CPU-bound job (a busy laptop, a shared CI
# runner) the trials and actors a test waits on get a few percent of the CPU while the test's own
# clock (nice 0) runs on: measured 6% against a 2-thread matrix loop. Tests compete evenly instead;
# the subprocess campaigns inherit it.
os.environ.setdefault("RAY_worker_niceness", "0")

import pytest
import torch

if os.environ.get("DFQ_TEST_DETERMINISTIC") == "1":  # tests/stress.sh varies it: no test may depend on it
    torch.use_deterministic_algorithms(True, warn_only=True)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DFQ_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $DFQ_SHARED_DATA); tests that need it skip when it is absent."""
    if not (SHARED_DATA / "weights").is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (set DFQ_SHARED_DATA)")
    return SHARED_DATA


# The calibration workload's time on an idle machine of this project's kind (2 cores, one thread).
REFERENCE_WORK_S = 0.11


def _work_seconds() -> float:
    """A fixed single-thread workload (matrix products and a Python loop), timed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(192, 192, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        for _ in range(450):  # long enough to span several of the scheduler's time slices
            a = torch.tanh(a @ a * 0.01)
            sum(range(2000))
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


class Patience:
    """Deadlines for tests that wait on something (a subprocess, a Ray actor, a file).

    A base deadline is written for a machine at load 4 (about three times what the idle machine
    needs); it is multiplied by ``factor``: how many times slower than the reference this machine ran
    a fixed workload at the start of the session (at least 1), or ``$DFQ_TEST_PATIENCE`` when set.
    A missed deadline fails with what was awaited, never a bare timeout.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, seconds: float) -> float:
        return seconds * self.factor

    def wait_for(
        self,
        what: str,
        done: Callable[[], bool],
        seconds: float,
        alive: Callable[[], bool] | None = None,
        progress: Callable[[], str] = lambda: "",
    ) -> None:
        """Poll ``done`` until it is true; fail naming ``what`` after the scaled deadline, or at once
        when ``alive`` says the awaited process has ended."""
        limit = self(seconds)
        deadline = time.monotonic() + limit
        while not done():
            if alive is not None and not alive():
                pytest.fail(f"the process ended before {what} {progress()}".rstrip())
            if time.monotonic() > deadline:
                pytest.fail(
                    f"waited {limit:.0f} s (patience x{self.factor:.1f}) for {what} {progress()}".rstrip()
                )
            time.sleep(0.2)

    def run(self, argv: list[str], what: str, seconds: float, **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(argv, **kwargs)`` with the scaled deadline; a timeout fails naming ``what``."""
        limit = self(seconds)
        try:
            return subprocess.run(argv, timeout=limit, **kwargs)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-2000:]
            pytest.fail(f"{what} did not finish within {limit:.0f} s (patience x{self.factor:.1f}): {tail!r}")


@pytest.fixture(scope="session")
def patience() -> Patience:
    """See :class:`Patience`."""
    given = os.environ.get("DFQ_TEST_PATIENCE")
    if given:
        return Patience(max(1.0, float(given)))
    measured = statistics.median(_work_seconds() for _ in range(3)) / REFERENCE_WORK_S
    return Patience(min(max(1.0, measured), 20.0))


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
