"""How the campaign driver's cost grows with the trials a study holds: the sampler's seconds per
proposal and the study's memory, for the campaign's own samplers (``make_sampler``: TPE, NSGA-II,
random) on the campaign's own define-by-run space (``SpaceFunction``: ResNet-20's per-layer bits and
the shipped space's method knobs, budget repair included).

A study is filled with N finished trials (random points of the space, a cheap objective of the plan:
no model is run), then the next ``--asks`` proposals are timed (ask, the space function, tell), as the
driver makes them when a trial ends. Seconds are the process's CPU time (a busy machine does not
inflate them); memory is what the filled study holds (Python allocations, tracemalloc).
The budget a cluster sets: a proposal must take less than (trial seconds / concurrent trials), e.g.
0.6 s for 100 GPUs running 60-second trials.

    python benchmarks/driver_cost.py                          # N = 100, 1000, 5000
    python benchmarks/driver_cost.py --trials 100 1000 --samplers tpe

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit


def plan_space():
    """The shipped ResNet-20 space (PTQ knobs only), made concrete for ResNet-20's layers."""
    import yaml

    from dfq_search.models import create_model
    from dfq_search.quant import trace_layers
    from dfq_search.search.define import PlanSpace, SpaceFunction
    from dfq_search.search.space import SPACE_DIR, parse_space

    raw = yaml.safe_load((SPACE_DIR / "cifar_resnet20.yaml").read_text())
    raw["method"] = {"kind": "ptq", "ptq": raw["method"]["ptq"]}
    raw["bits"]["weight"]["_default"] = [2, 3, 4, 5, 6, 8]
    space = parse_space(raw, "cifar_resnet20")
    bundle = create_model("cifar_resnet20")
    layers = trace_layers(bundle.model, bundle.preprocess.example_input())
    plans = PlanSpace(space, layers)
    return plans, SpaceFunction(plans)


def objective(config: dict) -> tuple[float, float]:
    """A cheap stand-in for a trial: a noisy score that rewards bits, and the plan's size."""
    bits = [b["w"] for b in config["plan"].values()]
    return sum(bits) / len(bits) + random.gauss(0, 0.1), config["cost"]["size_kib"]


def study_for(sampler: str, seed: int):
    import optuna

    from dfq_search.distributed.tune import make_sampler

    directions = ["maximize", "minimize"] if sampler == "nsga2" else ["maximize"]
    return optuna.create_study(sampler=make_sampler(sampler, seed), directions=directions)


def fill(study, space_fn, n: int, multi: bool) -> None:
    """Add ``n`` finished trials at random points of the space (as many earlier proposals would be)."""
    import optuna

    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trials = []
    for _ in range(n):
        t = probe.ask()
        score, size = objective(space_fn(t))
        values = [score, size] if multi else [score]
        trials.append(
            optuna.trial.create_trial(params=t.params, distributions=t.distributions, values=values)
        )
        probe.tell(t, 0.0)
    study.add_trials(trials)


def timed_asks(study, space_fn, asks: int, multi: bool) -> list[float]:
    out = []
    for _ in range(asks):
        start = time.process_time()
        t = study.ask()
        config = space_fn(t)
        out.append(time.process_time() - start)
        score, size = objective(config)
        study.tell(t, [score, size] if multi else score)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, nargs="+", default=[100, 1000, 5000], help="trials in the study")
    p.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "random"])
    p.add_argument("--asks", type=int, default=5, help="proposals timed after the study is filled")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import optuna
    import torch

    from dfq_search.report import format_table

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    random.seed(args.seed)
    plans, space_fn = plan_space()
    rows = []
    for sampler in args.samplers:
        for n in args.trials:
            multi = sampler == "nsga2"
            study = study_for(sampler, args.seed)
            tracemalloc.start()
            fill(study, space_fn, n, multi)
            held = tracemalloc.get_traced_memory()[0] / 2**20
            tracemalloc.stop()
            seconds = timed_asks(study, space_fn, args.asks, multi)
            rows.append({"sampler": sampler, "trials": n, "params": len(study.trials[0].params),
                         "ms_per_proposal": round(1000 * sum(seconds) / len(seconds), 1),
                         "max_ms": round(1000 * max(seconds), 1), "study_MiB": round(held, 1)})  # fmt: skip
            print(format_table(rows[-1:]), flush=True)
            del study
    print(format_table(rows))
    emit({"rows": rows, "layers": len(plans.choices), "asks": args.asks})


if __name__ == "__main__":
    main()
