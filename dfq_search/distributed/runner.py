"""The campaign's runner on Ray (:class:`dfq_search.search.runner.Runner`): Ray Tune for the trials, Ray
tasks for the reruns, generator actors for the shared samples; Tune's results read back as plain
:class:`~dfq_search.search.runner.TrialRecord` s."""

from __future__ import annotations

import os
from collections.abc import Mapping
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

        return records_of(*load_results(run_dir))

    def rerun(self, configs: list[dict[str, Any]], ctx: Any, cpu: float, gpu: float, done: Done) -> None:
        from dfq_search.distributed.rerun import run_trials

        run_trials(configs, ctx, cpu, gpu, done)


def _scored(df: Any) -> bool:
    return df is not None and "score" in df and "training_iteration" in df


def _level(df: Any) -> str:
    """The column of a report's level: its fidelity (every trial report has one), else Tune's count."""
    return "fidelity" if "fidelity" in df and df["fidelity"].notna().all() else "training_iteration"


def surviving(levels: list[int], scores: list[float]) -> list[float]:
    """The scores of a trial's reports that stand, by their level (the fidelity): a trial retried after
    a failure reports its first levels again, and a trial restarted from its final checkpoint (its
    driver killed before Tune recorded its end) its last one; those replace the earlier attempt's.
    (Tune's iteration goes on counting over a restart: it cannot tell them.)"""
    kept: list[tuple[int, float]] = []
    for it, score in zip(levels, scores, strict=True):
        while kept and kept[-1][0] >= it:
            kept.pop()
        kept.append((int(it), float(score)))
    return [s for _, s in kept]


def records_of(grid: Any, failures: Mapping[str, int] | None = None) -> list[TrialRecord]:
    """Plain records of Tune ``Result`` s (a ``ResultGrid``), in their order; ``failures``: failed
    attempts by trial folder (:func:`~dfq_search.distributed.tune.load_results`)."""
    out = []
    for result in grid:
        failed = (failures or {}).get(str(result.path), 0)
        metrics = dict(result.metrics or {})
        df = result.metrics_dataframe
        scores = surviving(df[_level(df)].tolist(), df["score"].tolist()) if _scored(df) else []
        out.append(
            TrialRecord(
                trial=metrics.get("trial_id") or Path(result.path).name,
                metrics=metrics,
                config=dict(result.config or {}),
                scores=scores,
                error=None if result.error is None else str(result.error) or type(result.error).__name__,
                checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
                path=str(result.path),
                retries=max(failed - (result.error is not None), 0),  # a failed trial's last failure ended it
            )
        )
    return out
