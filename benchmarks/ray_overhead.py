"""What Ray Tune costs a trial: the same trial (one fixed plan, PTQ) run in-process and under Tune.

Reported: the in-process wall time; under Tune, the trial's own wall time (Tune's ``time_total_s``:
from the trainable's start to its last report) and the driver's wall time of ``Tuner.fit`` (worker
start, the context shipped through the object store, scheduling, result and checkpoint handling);
the ratios to the in-process time. Ray's start-up (once per campaign) is reported apart.

    python benchmarks/ray_overhead.py                       # ResNet-20 (needs ../shared/data)
    python benchmarks/ray_overhead.py --model digits_cnn     # the embedded default model

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_WEIGHTS, emit, shared


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--bits", default="W4A4", help="the uniform plan (8-bit first/last layers)")
    p.add_argument("--iters", type=int, default=100, help="reconstruction steps per unit")
    p.add_argument("--calibration", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="runs of each, the fastest reported")
    return p.parse_args()


def setup(args):
    from dfq_search.models import create_model
    from dfq_search.quant import parse_bits, trace_layers
    from dfq_search.search.define import PlanSpace, SpaceFunction
    from dfq_search.search.objective import FidelityScorer
    from dfq_search.search.samples import campaign_samples
    from dfq_search.search.space import parse_space
    from dfq_search.search.trial import TrialContext

    weights = shared(CIFAR_WEIGHTS[args.model]) if args.model in CIFAR_WEIGHTS else None
    bundle = create_model(args.model, weights)
    bits = parse_bits(args.bits)
    space = parse_space({
        "bits": {"weight": {"_default": [bits.w], "_first_last": [8]},
                 "activation": {"_default": [bits.a], "_first_last": [8]}},
        "method": {"kind": "ptq", "ptq": {"recon.iters": args.iters}},
        "samples": {"source": "direct", "calibration": args.calibration, "heldout": 256},
        "objective": {"reports": 3},
    })  # fmt: skip
    samples = campaign_samples(bundle, space.samples)
    plans = PlanSpace(space, trace_layers(bundle.model, bundle.preprocess.example_input()))
    config = SpaceFunction(plans)(_FixedTrial())
    ctx = TrialContext(bundle.model, bundle.name, bundle.num_classes, bundle.preprocess.shape,
                       samples.calib, FidelityScorer(bundle.model, samples.heldout, "kl"),
                       reports=3)  # fmt: skip
    return space, plans, config, ctx


class _FixedTrial:
    """An Optuna-trial stand-in for a space with no free parameter."""

    def suggest_categorical(self, name, choices):
        return choices[0]


def in_process(config, ctx) -> float:
    import torch

    from dfq_search.search.trial import run_trial

    torch.set_num_threads(1)
    start = time.perf_counter()
    run_trial(config, ctx, lambda metrics, folder: None)
    return time.perf_counter() - start


def under_tune(space, plans, ctx, storage: Path, name: str) -> tuple[float, float]:
    from dfq_search.distributed.tune import TuneSetup, run_tuner
    from dfq_search.search.define import SpaceFunction

    s = TuneSetup(
        space_fn=SpaceFunction(plans),
        points=[],
        ctx=ctx,
        trials=1,
        sampler="random",
        seed=0,
        concurrency=1,
        mode="pareto",
        reports=3,
        trial_cpu=1.0,
        trial_gpu=0.0,
        max_failures=0,
    )
    start = time.perf_counter()
    grid = run_tuner(s, str(storage), name, resume=False)
    fit = time.perf_counter() - start
    return float(grid[0].metrics["time_total_s"]), fit


def main() -> None:
    args = parse_args()
    from dfq_search import distributed

    space, plans, config, ctx = setup(args)
    t = time.perf_counter()
    distributed.init(None, num_cpus=2)
    ray_start = time.perf_counter() - t
    local, trial, fit = [], [], []
    with tempfile.TemporaryDirectory(prefix="dfq_overhead_") as tmp:
        for i in range(args.repeats):
            local.append(in_process(config, ctx))
            a, b = under_tune(space, plans, ctx, Path(tmp), f"r{i}")
            trial.append(a)
            fit.append(b)
            print(
                f"repeat {i}: in-process {local[-1]:.2f} s, under Tune: trial {a:.2f} s, fit {b:.2f} s",
                flush=True,
            )
    best = min(local)
    emit({"model": args.model, "bits": args.bits, "iters": args.iters, "in_process_s": best,
          "tune_trial_s": min(trial), "tune_fit_s": min(fit), "trial_ratio": min(trial) / best,
          "fit_ratio": min(fit) / best, "ray_start_s": ray_start, "runs": {"in_process": local,
          "tune_trial": trial, "tune_fit": fit}})  # fmt: skip


if __name__ == "__main__":
    main()
