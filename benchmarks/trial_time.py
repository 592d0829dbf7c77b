"""Where one search trial's time goes: a ResNet-20 PTQ trial of the mixed-precision benchmark (uniform
W3A4 plan, its reports scored on half A of the CIFAR-10 test images, as the campaign does), run in this
process, split into reconstruction steps, captures of the units' inputs and targets, scoring, and the
rest (calibration, the guard, the checkpoint).

    python benchmarks/trial_time.py --threads 1 --repeats 2

Run it on two commits to compare them. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_TEST, CIFAR_WEIGHTS, emit, shared
from plan_seeds import _First
from search_mixed_precision import campaign_parser, halves, space_for


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=100, help="reconstruction steps per unit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a campaign's trial has 1)")
    p.add_argument("--repeats", type=int, default=2, help="trials timed (the first pays the imports)")
    p.add_argument("--weight-bits", type=int, default=3)
    return p.parse_args()


class Timed:
    """Inside ``with``, ``module.name``'s calls add their seconds to ``self.seconds`` (absent on an
    older commit: 0)."""

    def __init__(self, module, name: str) -> None:
        self.module, self.name, self.seconds = module, name, 0.0
        self.real = getattr(module, name, None)

    def __enter__(self) -> Timed:
        if self.real is not None:
            setattr(self.module, self.name, self._timed)
        return self

    def __exit__(self, *exc) -> None:
        if self.real is not None:
            setattr(self.module, self.name, self.real)

    def _timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def setup(args):
    import torch

    from dfq_search.data.folder import load_image_folder
    from dfq_search.models import create_model
    from dfq_search.quant import trace_layers
    from dfq_search.search.define import PlanSpace, SpaceFunction
    from dfq_search.search.objective import LabelledScorer
    from dfq_search.search.samples import campaign_samples
    from dfq_search.search.trial import TrialContext

    torch.set_num_threads(args.threads)
    space = space_for(campaign_parser().parse_args(["--iters", str(args.iters)]), args.weight_bits, "tpe", 0)
    bundle = create_model("cifar_resnet20", shared(CIFAR_WEIGHTS["cifar_resnet20"]))
    half_a, _ = halves(load_image_folder(shared(CIFAR_TEST), bundle.preprocess))
    samples = campaign_samples(bundle, space.samples, "cpu")
    plans = PlanSpace(space, trace_layers(bundle.model, bundle.preprocess.example_input()))
    config = {**SpaceFunction(plans)(_First()), "seed": 0, "ptq.recon.iters": args.iters}
    config["plan"] = {n: {"w": b.w, "a": b.a} for n, b in plans.uniform(args.weight_bits, 4).items()}
    ctx = TrialContext(bundle.model, bundle.name, bundle.num_classes, bundle.preprocess.shape, samples.calib,
                       LabelledScorer(bundle.model, half_a, bundle.preprocess), space.objective.reports,
                       space.objective.eval_fraction, preprocess=bundle.preprocess,
                       heldout=samples.heldout)  # fmt: skip
    return config, ctx


def time_trial(config: dict, ctx) -> dict:
    """One trial, timed by part."""
    from dfq_search.ptq import pipeline
    from dfq_search.search.trial import run_trial

    parts = {"steps": Timed(pipeline, "reconstruct_chain_"), "captures": Timed(pipeline, "capture"),
             "carried": Timed(pipeline, "_run")}  # fmt: skip
    scoring, real_scorer, scores = [0.0], ctx.scorer, []

    def scorer(q, fraction=1.0):
        start = time.perf_counter()
        out = real_scorer(q, fraction)
        scoring[0] += time.perf_counter() - start
        return out

    ctx.scorer = scorer
    with contextlib.ExitStack() as stack:
        for timer in parts.values():
            stack.enter_context(timer)
        start = time.perf_counter()
        run_trial(config, ctx, lambda metrics, folder: scores.append(metrics["score"]))
        total = time.perf_counter() - start
    ctx.scorer = real_scorer
    captures = parts["captures"].seconds + parts["carried"].seconds
    split = {"steps": parts["steps"].seconds, "captures": captures, "scoring": scoring[0]}
    split["other"] = total - sum(split.values())
    return {"seconds": round(total, 2), **{k: round(v, 2) for k, v in split.items()}, "scores": scores}


def main() -> None:
    args = parse_args()
    config, ctx = setup(args)
    runs = []
    for _ in range(args.repeats):
        runs.append(run := time_trial(config, ctx))
        print(f"trial: {run}", flush=True)
    emit({"iters": args.iters, "threads": args.threads, "runs": runs,
          "best_seconds": min(r["seconds"] for r in runs)})  # fmt: skip


if __name__ == "__main__":
    main()
