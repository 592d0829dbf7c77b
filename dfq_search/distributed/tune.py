"""The campaign on Ray Tune: ``OptunaSearch`` proposes trials from the define-by-run space, a
``ConcurrencyLimiter`` bounds how many run at once, ASHA stops bad trials early (accuracy mode), and
every trial runs :func:`dfq_search.search.trial.run_trial` in a worker with its share of CPUs/GPUs.

Resume: Tune saves the searcher (the Optuna study, pickled) and every trial's state under the storage
path; ``Tuner.restore`` continues an interrupted campaign without rerunning finished trials (the space
function lives in an importable module for this). ASHA's state is not restored by Tune: a resumed
campaign's unfinished trials restart from their beginning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from dfq_search.distributed.session import node_id, trial_device
from dfq_search.search.runner import TrialsSpec, print_line
from dfq_search.search.trial import TrialContext, run_trial


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by name, seeded (budget constraints reach it through the trials, set by the
    space function: TPE, NSGA-II and GP use them)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {"seed": seed}
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, group=False, n_startup_trials=8, **kwargs)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(**kwargs)
    if name == "gp":
        return optuna.samplers.GPSampler(**kwargs)
    if name == "qmc":
        return optuna.samplers.QMCSampler(**kwargs)
    if name == "random":
        return optuna.samplers.RandomSampler(**kwargs)
    raise ValueError(f"sampler {name!r} is not one of dfq_search.search.space.SAMPLERS")  # checked before


def _trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """A Tune function trainable: one trial, on this worker's GPU when it has one."""
    ctx.device = trial_device()
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))

    node = node_id()

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
        tune.report({**metrics, "node": node}, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()  # only a final report makes one: the trial had finished
    with checkpoint.as_directory() if checkpoint is not None else nullcontext(None) as folder:
        run_trial(config, ctx, report, restored=None if folder is None else Path(folder))


TuneSetup = TrialsSpec  # what a campaign hands to Tune (dfq_search.search.runner), built by keyword


def _searcher(s: TuneSetup) -> Any:
    multi = s.mode == "pareto"
    metric, mode = (["score", "size_kib"], ["max", "min"]) if multi else ("score", "max")
    sampler = make_sampler(s.sampler, s.seed)
    search = OptunaSearch(
        space=s.space_fn, metric=metric, mode=mode, sampler=sampler, points_to_evaluate=s.points or None
    )
    return ConcurrencyLimiter(search, max_concurrent=s.concurrency)


def _trainable_with(s: TuneSetup) -> Any:
    gpu = s.trial_gpu if s.explicit_gpu or ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return tune.with_resources(tune.with_parameters(_trainable, ctx=s.ctx), {"cpu": s.trial_cpu, "gpu": gpu})


def run_tuner(s: TuneSetup, storage: str, name: str, resume: bool) -> tune.ResultGrid:
    """Run (or, with ``resume``, continue) the campaign ``name`` under ``storage`` (a folder or URI)."""
    path = f"{storage.rstrip('/')}/{name}"
    trainable = _trainable_with(s)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=s.reports, grace_period=1, reduction_factor=2)
        if s.mode == "accuracy" and s.reports > 1
        else FIFOScheduler()
    )
    single = s.mode == "accuracy"
    tune_config = tune.TuneConfig(
        search_alg=_searcher(s),
        scheduler=scheduler,
        num_samples=s.trials,
        time_budget_s=s.time_budget_s,
        metric="score" if single else None,
        mode="max" if single else None,
        reuse_actors=True,  # a worker process serves trial after trial: no torch import per trial
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage),
        callbacks=[ProgressLine(s.trials, s.log), *([TensorBoardCurves(s.curves)] if s.curves else [])],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=s.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config).fit()


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def load_results(path: Path) -> tuple[tune.ResultGrid, dict[str, int]]:
    """The results of a finished or running campaign, read from its folder (no Ray session needed),
    and how many attempts of each trial failed (by trial folder; a lost node's trials are retried)."""
    analysis = tune.ExperimentAnalysis(str(path))
    return tune.ResultGrid(analysis), {str(t.path): int(t.num_failures) for t in analysis.trials}


class ProgressLine(tune.Callback):
    """One line per finished trial: its score, size and the best so far."""

    def __init__(self, total: int, log: Callable[[str], None] = print_line) -> None:
        self.total, self.log, self.done, self.best = total, log, 0, None
        self.start = time.perf_counter()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        r = trial.last_result or {}
        score, feasible = r.get("score"), r.get("feasible", True)
        if score is not None and feasible and (self.best is None or score > self.best):
            self.best = score
        shown = "over budget" if not feasible else f"score {score:.4f}" if score is not None else "no result"
        self.log(
            f"  [{time.perf_counter() - self.start:6.1f} s] trial {self.done}/{self.total} "
            f"{trial.trial_id}: {shown}, {r.get('size_kib', float('nan')):.2f} KiB, "
            f"report {r.get('fidelity', '?')}; best {'-' if self.best is None else f'{self.best:.4f}'}"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        self.log(
            f"  [{time.perf_counter() - self.start:6.1f} s] trial {self.done}/{self.total} "
            f"{trial.trial_id}: FAILED (see results.parquet for the reason)"
        )


class TensorBoardCurves(tune.Callback):
    """Every trial's reports as TensorBoard curves, one run per trial under ``folder``."""

    KEYS = ("score", "agreement", "top1", "kl", "size_kib")

    def __init__(self, folder: Path) -> None:
        self.folder, self.writers = folder, {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if trial.trial_id not in self.writers:
            self.writers[trial.trial_id] = SummaryWriter(str(self.folder / trial.trial_id))
        writer, step = self.writers[trial.trial_id], int(result.get("fidelity", iteration))
        for key in self.KEYS:
            if isinstance(result.get(key), (int, float)):
                writer.add_scalar(f"trial/{key}", result[key], step)
        writer.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        writer = self.writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()

    on_trial_error = on_trial_complete
