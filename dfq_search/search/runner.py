"""What a campaign asks of the machinery that runs its trials, as a small interface with plain records
(Ray Tune implements it: :class:`dfq_search.distributed.runner.RayRunner`); ``dfq_search.search``
imports neither Ray nor ``dfq_search.distributed``.

A runner starts its workers, fills a shared sample buffer from generator workers (``samples.source:
generator``), runs or resumes a campaign's trials (:class:`TrialsSpec`), reads them back as rows (one
plain dict per trial, with the config it ran) from the campaign's folder, and runs chosen configs again
(the finalists with other seeds), handing each result back as it ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Log = Callable[[str], None]


def print_line(line: str) -> None:
    """The default log: the line on standard output. A module function, not ``print`` itself: Tune
    pickles its callbacks with the log in them, and ``print`` pickles only while ``builtins.print`` is
    the object it was when this module was imported (a test or tool that swaps it breaks the pickle)."""
    print(line, flush=True)


# done(i, final metrics, the model file's bytes, error line): a rerun's result, as soon as it ends
Done = Callable[[int, dict[str, Any] | None, bytes | None, str | None], None]


@dataclass(frozen=True, kw_only=True)
class TrialsSpec:
    """The trials of a campaign, built by keyword (the fields are the space's and the command's)."""

    space_fn: Callable[[Any], dict[str, Any]]  # the define-by-run space (dfq_search.search.define)
    points: list[dict[str, Any]]  # warm starts, run first
    ctx: Any  # the TrialContext every trial shares
    trials: int
    sampler: str
    seed: int
    concurrency: int
    mode: str  # accuracy | pareto
    reports: int
    trial_cpu: float
    trial_gpu: float
    max_failures: int
    time_budget_s: float | None = None
    explicit_gpu: bool = False  # on a cluster, ask for trial_gpu even before GPU nodes are up
    log: Log = print_line  # one line per finished trial
    curves: Path | None = None  # a folder for TensorBoard curves of every trial


@dataclass(frozen=True)
class TrialRecord:
    """One trial as its runner recorded it: plain values only (``results.result_rows`` makes the rows)."""

    trial: str
    metrics: dict[str, Any]  # the last report
    config: dict[str, Any]  # what the space function returned, and the sampled parameters
    scores: list[float] = field(default_factory=list)  # every report's score, in order
    error: str | None = None  # the error of a trial that raised (a remote traceback's text)
    checkpoint: str | None = None  # the folder of the last report's model
    path: str = ""  # the trial's folder
    retries: int = 0  # times the trial was started again after a failed attempt (e.g. its node was lost)


class Runner(Protocol):
    """The machinery a campaign runs on (see the module docstring)."""

    def start(self, address: str | None, num_cpus: int | None) -> None:
        """Start (or join, at ``address``) the workers; idempotent."""

    def generator_samples(
        self, bundle: Any, samples: Any, bank: str, name: str, resources: Any, log: Log
    ) -> tuple[Callable[[int], Any], Any, float, str]:
        """Fill (or reload) the shared buffer: (draw, held-out samples, seconds, origin)."""

    def run_trials(self, spec: TrialsSpec, storage: str, name: str, resume: bool) -> None:
        """Run (or continue) the campaign ``name``'s trials under ``storage`` (a folder or URI)."""

    def records(self, run_dir: Path) -> list[TrialRecord]:
        """Every trial of the campaign in ``run_dir``, finished, stopped, failed or running."""

    def rerun(self, configs: list[dict[str, Any]], ctx: Any, cpu: float, gpu: float, done: Done) -> None:
        """Run each config as a trial again; ``done`` for each as it ends."""
