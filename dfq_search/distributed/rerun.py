"""Trials run again outside Tune (the campaign's finalists with other reconstruction seeds): one Ray task
each, with a trial's resources; each result (final metrics and the model file's bytes) is handed to the
driver as soon as its task ends, so what finished survives a crash of the rest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from dfq_search.distributed.session import gpu_fraction, trial_device
from dfq_search.search.trial import TrialContext, run_trial

Done = Callable[[int, dict[str, Any] | None, bytes | None, str | None], None]


def _rerun(config: dict[str, Any], ctx: TrialContext, cpus: float) -> tuple[dict[str, Any], bytes]:
    """One trial, in a Ray task: its final metrics and its model file."""
    ctx.device = trial_device()
    ctx.memo = None  # the caller keeps what it needs
    torch.set_num_threads(max(1, int(cpus)))
    out: dict[str, Any] = {}

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        if folder is not None:
            out["metrics"], out["model"] = metrics, (Path(folder) / "model.pt").read_bytes()

    run_trial(config, ctx, report)
    return out["metrics"], out["model"]


def run_trials(configs: list[dict[str, Any]], ctx: TrialContext, cpu: float, gpu: float, done: Done) -> None:
    """Run every config as a trial; ``done(i, metrics, model_bytes, error)`` for each as it ends
    (``error``: the exception line of a trial that raised, the others None)."""
    if not configs:
        return
    task = ray.remote(_rerun).options(num_cpus=cpu, num_gpus=gpu_fraction(gpu), max_retries=0)
    ctx_ref = ray.put(ctx)
    pending = {task.remote(c, ctx_ref, cpu): i for i, c in enumerate(configs)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            metrics, blob = ray.get(ready[0])
        except Exception as err:  # a failed rerun costs its own result only
            done(i, None, None, str(err).strip().splitlines()[-1][:500] if str(err).strip() else repr(err))
            continue
        done(i, metrics, blob, None)
