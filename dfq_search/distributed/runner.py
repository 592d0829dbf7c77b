"""The campaign's runner on Ray (:class:`dfq_search.search.runner.Runner`): Ray Tune for the trials, Ray
tasks for the reruns, generator actors for the shared samples; Tune's results read back as plain
:class:`~dfq_search.search.runner.TrialRecord` s."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dfq_search.search.runner import Done, Log, TrialRecord, TrialsSpec


class RayRunner:
    """A :class:`~dfq_search.search.runner.Runner` on a local Ray or a cluster (``start(address)``)."""

    def start(self, address: str | None, num_cpus: int | None) -> None:
        from dfq_search.distributed.session import init

        init(address, num_cpus=num_cpus or os.cpu_count())

    def generator_samples(self, bundle: Any, samples: Any, bank: str, name: str, resources: Any, log: Log):
        from dfq_search.distributed.campaign import generator_samples

        return generator_samples(bundle, samples, bank, name, resources, log)

    def run_trials(self, spec: TrialsSpec, storage: str, name: str, resume: bool) -> None:
        from dfq_search.distributed.tune import run_tuner

        run_tuner(spec, storage, name, resume)

    def records(self, run_dir: Path) -> list[TrialRecord]:
        from dfq_search.distributed.tune import load_results

        return records_of(load_results(run_dir))

    def rerun(self, configs: list[dict[str, Any]], ctx: Any, cpu: float, gpu: float, done: Done) -> None:
        from dfq_search.distributed.rerun import run_trials

        run_trials(configs, ctx, cpu, gpu, done)


def records_of(grid: Any) -> list[TrialRecord]:
    """Plain records of Tune ``Result`` s (a ``ResultGrid``), in their order."""
    out = []
    for result in grid:
        metrics = dict(result.metrics or {})
        df = result.metrics_dataframe
        scores = [float(v) for v in df["score"].tolist()] if df is not None and "score" in df else []
        out.append(
            TrialRecord(
                trial=metrics.get("trial_id") or Path(result.path).name,
                metrics=metrics,
                config=dict(result.config or {}),
                scores=scores,
                error=None if result.error is None else str(result.error) or type(result.error).__name__,
                checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
                path=str(result.path),
            )
        )
    return out
