"""One trial as plain Python: build Q from the trial's plan and settings, quantize it (PTQ, fine-tuning,
or PTQ then fine-tuning) on the campaign's synthetic samples, and report the objective as it goes.

``run_trial(config, ctx, report)`` is what Ray Tune runs in a worker (dfq_search.distributed.tune) and
what the tests and the overhead benchmark run in-process. ``report(metrics, checkpoint_dir)`` is
called ``ctx.reports`` times (the fidelities a scheduler can stop a trial at): intermediate reports
score a fraction of the objective's images, the last one all of them, with the folder holding the
quantized model (``model.pt``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfq_search.checkpoint import save_quantized
from dfq_search.fingerprint import config_hash
from dfq_search.quant import PROTOCOLS, BitPlan
from dfq_search.search.method import distill_config, game_config, ptq_config
from dfq_search.search.space import Objective, Samples

Report = Callable[[dict[str, Any], Path | None], None]
INFEASIBLE_SCORE = -1e3  # what an over-budget plan scores (it is never computed); TPE only ranks
METRICS = "metrics.json"  # a final checkpoint's (and a memo's) metrics


class TrialFailed(RuntimeError):
    """A trial whose result cannot be used (a NaN objective); recorded as failed with this reason."""


@dataclass
class TrialContext:
    """What every trial of a campaign shares (shipped once through Ray's object store)."""

    p: nn.Module
    model_name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    calib: Tensor | None  # calibration images (P's input space), or None to draw them
    scorer: Any  # FidelityScorer | LabelledScorer
    reports: int = Objective.reports  # the space's defaults: one source for each setting
    eval_fraction: float = Objective.eval_fraction
    device: str = "cpu"
    draw: Callable[[int], Tensor] | None = None  # n -> samples from the campaign's shared buffer
    calibration: int = Samples.calibration  # how many to draw
    preprocess: Any = None  # P's Preprocess, kept in the checkpoints (a user model needs it to rebuild)
    memo: str | None = None  # folder of finished trials' results by config: a repeated config is replayed
    heldout: Tensor | None = None  # held-out synthetic images, never calibrated on (PTQ's guard)
    units: str | None = None  # folder of reconstructed groups that later trials with the same prefix load

    def calibration_images(self) -> Tensor:
        return self.calib if self.calib is not None else self.draw(self.calibration)


def knobs_of(config: dict[str, Any], part: str) -> dict[str, Any]:
    """The ``part.`` knobs of a trial config, without the prefix: paths of the config they set."""
    return {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(f"{part}.")}


def _marks(total: int, levels: int) -> list[int]:
    """``levels`` points spread over (0, total): where intermediate reports go."""
    return [math.ceil(total * j / (levels + 1)) for j in range(1, levels + 1)]


def run_trial(
    config: dict[str, Any], ctx: TrialContext, report: Report, restored: Path | None = None
) -> dict[str, Any]:
    """Run one trial (see the module docstring); returns its final metrics. A config that a finished
    trial of the campaign already ran (a sampler may propose one twice) is replayed from ``ctx.memo``:
    the same reports and model, marked ``replayed``, with no compute. ``restored``: the checkpoint a
    trial restarts from, which only its final report makes (a driver killed before Tune recorded the
    trial's end restarts it): that report is made once more from it, with no compute."""
    if restored is not None and (done := report_again(restored, ctx.reports, report)) is not None:
        return done
    memo = Memo(ctx.memo, config) if ctx.memo else None
    if memo is not None and (done := memo.replay(ctx.reports, report)) is not None:
        return done
    return _Trial(config, ctx, report, memo).run()


def report_again(folder: Path, reports: int, report: Report) -> dict[str, Any] | None:
    """The final report of a finished trial made again from its checkpoint ``folder`` (its metrics and
    model), marked ``replayed``; None when the folder holds no metrics (a checkpoint of an older
    version: the trial runs again)."""
    if (metrics := read_metrics(folder)) is None:
        return None
    metrics = {**metrics, "replayed": 1.0, "seconds": 0.0, "fidelity": reports}
    report(metrics, folder)
    return metrics


def read_metrics(folder: Path) -> dict[str, Any] | None:
    """``folder/metrics.json`` (a final checkpoint's or a memo's); None when absent or unreadable."""
    try:
        return json.loads((folder / METRICS).read_text())
    except (OSError, ValueError):
        return None


def write_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    """``metrics`` as ``folder/metrics.json`` (left out when a metric is not a number)."""
    with suppress(TypeError, ValueError):  # json.dumps fails before anything is written
        (folder / METRICS).write_text(json.dumps(metrics, default=float))


class Memo:
    """A finished trial's final metrics and model, under ``<folder>/<config hash>/`` (written atomically)."""

    def __init__(self, folder: str, config: dict[str, Any]) -> None:
        self.path = Path(folder) / config_hash(config)

    def replay(self, reports: int, report: Report) -> dict[str, Any] | None:
        if (metrics := read_metrics(self.path)) is None:
            return None
        metrics = {**metrics, "replayed": 1.0, "seconds": 0.0}
        for level in range(1, reports):
            report({**metrics, "fidelity": level}, None)
        report({**metrics, "fidelity": reports}, self.path)
        return metrics

    def save(self, metrics: dict[str, Any], model_dir: Path) -> None:
        if self.path.exists():
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            (tmp / METRICS).write_text(json.dumps(metrics, default=float))
            os.replace(tmp, self.path)
        except (OSError, TypeError, ValueError):  # another trial of this config won the race, a full
            # disk, or a metric that is not a number: no memo (the trial itself is unaffected)
            shutil.rmtree(tmp, ignore_errors=True)


class _Trial:
    def __init__(self, config: dict[str, Any], ctx: TrialContext, report: Report, memo: Memo | None) -> None:
        self.config, self.ctx, self.report, self.memo = config, ctx, report, memo
        self.plan = BitPlan(config["plan"])
        self.kind = config.get("kind", "ptq")
        self.base = {
            **config.get("cost", {}),
            "feasible": bool(config.get("feasible", True)),
            "kind": self.kind,
        }
        self.start, self.level = time.perf_counter(), 0
        self.extra: dict[str, float] = {}
        self._calib: Tensor | None = None

    def calib(self) -> Tensor:
        """The trial's calibration images, drawn once (PTQ and the distillation share them)."""
        if self._calib is None:
            self._calib = self.ctx.calibration_images()
        return self._calib

    def emit(self, q: nn.Module, final: bool = False) -> dict[str, Any]:
        """Score ``q`` and report it (the final report comes with the checkpoint)."""
        self.level += 1
        fraction = 1.0 if final else self.ctx.eval_fraction
        metrics = {
            **self.base,
            **self.ctx.scorer(q, fraction),
            **self.extra,
            "fidelity": self.level,
            "seconds": time.perf_counter() - self.start,
        }
        if not math.isfinite(metrics["score"]):
            raise TrialFailed(f"the objective is not finite ({metrics['score']}) at report {self.level}")
        if not final:
            self.report(metrics, None)
        return metrics

    def run(self) -> dict[str, Any]:
        if not self.base["feasible"]:
            metrics = {**self.base, "score": INFEASIBLE_SCORE, "fidelity": self.ctx.reports, "seconds": 0.0}
            self.report(metrics, None)
            return metrics
        p = self.ctx.p.to(self.ctx.device).eval()
        levels = self.ctx.reports - 1  # intermediate reports; the last one is the final
        ptq_levels = levels if self.kind == "ptq" else levels // 2 if "+" in self.kind else 0
        q = self._ptq(p, ptq_levels) if "ptq" in self.kind else None
        if "qat" in self.kind:
            q = self._qat(p, q, levels - self.level)
        if "distill" in self.kind:
            q = self._distill(p, q, levels - self.level)
        while self.level < levels:  # fewer reconstruction groups than reports: repeat the figure
            self.emit(q)
        return self._final(q)

    def _ptq(self, p: nn.Module, levels: int) -> nn.Module:
        from dfq_search.ptq import run_ptq
        from dfq_search.ptq.reuse import UnitStore

        cfg = ptq_config(knobs_of(self.config, "ptq"), int(self.config.get("seed", 0)))
        start, marks = self.level, []

        store = UnitStore(self.ctx.units) if self.ctx.units else None

        def progress(done: int, total: int, q: nn.Module) -> None:
            nonlocal marks
            marks = marks or _marks(total, levels)
            if store is not None:
                self.extra["reused_units"] = store.hits
            if done in marks and done < total and self.level - start < levels:
                self.emit(q)

        batches = list(torch.split(self.calib(), 64))
        result = run_ptq(p, self.plan, batches, cfg, PROTOCOLS["ptq"].config, self.ctx.device, progress,
                         heldout=self.ctx.heldout, reuse=store)  # fmt: skip
        self.extra = {"oscillation": result.oscillation, "rise": result.rise}
        if store is not None:
            self.extra["reused_units"] = store.hits
        if result.guard is not None:  # "rtn" when reconstruction lost fidelity on the held-out images
            self.extra["guard_kept"] = result.guard["kept"]
        return result.model

    def _qat(self, p: nn.Module, q: nn.Module | None, levels: int) -> nn.Module:
        from dfq_search.qat import Game, start_q

        cfg = game_config(knobs_of(self.config, "qat"), int(self.config.get("seed", 0)))
        if q is None:
            q = start_q(
                p,
                self.plan,
                self.ctx.input_shape,
                PROTOCOLS["generative"].config,
                "rtn",
                device=self.ctx.device,
            )
        game = Game(p, q, cfg, self.ctx.input_shape, self.ctx.num_classes, self.ctx.device)
        shared = getattr(self.ctx.draw, "generator_state", None)
        state = shared(cfg.source.name) if shared is not None else None
        if state is not None:  # the campaign's generator workers did the warm-up for every trial
            from dfq_search.bank import warm_start

            warm_start(game, state)
            self.extra["generator_warm_start"] = 1.0
        warmup, steps = cfg.train.warmup, cfg.train.iterations - cfg.train.warmup
        for mark in _marks(steps, levels):
            game.run(until=warmup + mark)
            self.emit(game.q.eval())
        game.run()
        return game.q.eval()

    def _distill(self, p: nn.Module, q: nn.Module, levels: int) -> nn.Module:
        """Distil the PTQ model to P on the trial's calibration images; with held-out images, Q ends
        in its most faithful state on them (the PTQ start included)."""
        from dfq_search.qat.distill import distill

        cfg = distill_config(knobs_of(self.config, "distill"), int(self.config.get("seed", 0)))
        marks = set(_marks(cfg.steps, levels))

        def monitor(step: int, model: nn.Module) -> None:
            if step in marks and step < cfg.steps:
                self.emit(model.eval())

        images = self.calib().to(self.ctx.device)
        info = distill(p, q, images, cfg, monitor, every=1, heldout=self.ctx.heldout)
        self.extra["distill_s"] = info["seconds"]
        if "kept_step" in info:  # the step of the most faithful state (0: the PTQ start)
            self.extra["distill_kept_step"] = float(info["kept_step"])
        return q.eval()

    def _final(self, q: nn.Module) -> dict[str, Any]:
        metrics = self.emit(q, final=True)
        config = PROTOCOLS["ptq" if "ptq" in self.kind else "generative"].config
        with tempfile.TemporaryDirectory(prefix="dfq_trial_") as tmp:
            ctx = self.ctx
            save_quantized(Path(tmp) / "model.pt", q, ctx.model_name, ctx.num_classes, self.plan, config,
                           ctx.preprocess)  # fmt: skip
            write_metrics(Path(tmp), metrics)  # a trial restarted from this checkpoint reports them again
            if self.memo is not None:
                self.memo.save(metrics, Path(tmp))
            self.report(metrics, Path(tmp))
        return metrics
