"""Does searching the fine-tuning stage pay (issue 17, item 3)? The shipped space
``cifar_resnet20_distill`` (uniform W2A4 with 8-bit first/last layers, BRECQ, then end-to-end
distillation to P whose learning rate, temperature, trainable part, MixUp and shift are searched),
run as a campaign that maximises top-1 on half A of the CIFAR-10 test images (even indices). Then, on
half B (odd indices, which no search saw), each over ``--seeds`` (a seed: a new reconstruction and
distillation): the PTQ start, the distillation at DistillConfig's defaults (the space's steps) and at
the campaign's best config.

    python benchmarks/distill_search.py --trials 10 --seeds 0 1
    python benchmarks/distill_search.py --model cifar_resnet32 --trials 10 --seeds 0 1

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_TEST, CIFAR_WEIGHTS, emit, shared
from plan_seeds import reconstruct
from search_mixed_precision import halves

SPACE = "cifar_resnet20_distill"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar_resnet20", choices=sorted(CIFAR_WEIGHTS))
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the space's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the half-B comparison")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the comparison's runs")
    p.add_argument("--storage", type=Path, default=Path("runs/bench-distill"))
    return p.parse_args()


def space_of(args):
    import yaml

    from dfq_search.search.space import SPACE_DIR, parse_space

    raw = yaml.safe_load((SPACE_DIR / f"{SPACE}.yaml").read_text())
    raw["model"]["name"] = args.model
    if args.steps is not None:
        raw["method"]["distill"]["steps"] = args.steps
    raw["objective"]["metric"] = "top1"  # on half A, the campaign's labelled validation images
    raw["search"] |= {"trials": args.trials, "refine_top": 0}  # the seeds below are the comparison
    return parse_space(raw, SPACE)


def campaign(args, space, half_a, half_b) -> dict:
    """Run (or resume) the campaign; its best trial's row."""
    from dfq_search.distributed.runner import RayRunner
    from dfq_search.search.campaign import CampaignOptions, run_campaign

    opts = CampaignOptions(space, args.model, str(shared(CIFAR_WEIGHTS[args.model])), storage=args.storage,
                           resume=True, val_images=half_a, test_images=half_b)  # fmt: skip
    result = run_campaign(opts, lambda line: print(line, flush=True), runner=RayRunner())
    if result.best is None:
        sys.exit(f"the campaign in {result.run_dir} has no complete trial")
    return result.best


def configs(best: dict, space) -> dict[str, dict]:
    """The three configs compared: the PTQ start, the defaults, the best (plan, PTQ knobs the same)."""
    params = json.loads(best["params"])
    base = {k: v for k, v in params.items() if not k.startswith("distill.") and k != "seed"}
    base["plan"] = json.loads(best["plan"])
    fixed = {f"distill.{k}": knob.value for k, knob in space.distill.items() if knob.fixed}
    searched = {k: v for k, v in params.items() if k.startswith("distill.")}
    return {"ptq start": {**base, "kind": "ptq"}, "defaults": {**base, **fixed},
            "best": {**base, **fixed, **searched}}  # fmt: skip


def main() -> None:
    args = parse_args()
    import torch

    from dfq_search.data.folder import load_image_folder
    from dfq_search.evaluate import Evaluator
    from dfq_search.models import create_model
    from dfq_search.search.objective import FidelityScorer
    from dfq_search.search.samples import campaign_samples
    from dfq_search.search.trial import TrialContext

    torch.set_num_threads(1)
    bundle = create_model(args.model, shared(CIFAR_WEIGHTS[args.model]))
    half_a, half_b = halves(load_image_folder(shared(CIFAR_TEST), bundle.preprocess))
    space = space_of(args)
    start = time.perf_counter()
    best = campaign(args, space, half_a, half_b)
    search_s = time.perf_counter() - start
    torch.set_num_threads(args.threads)
    samples = campaign_samples(bundle, space.samples)
    evals = {h: Evaluator(d, bundle.preprocess) for h, d in (("A", half_a), ("B", half_b))}
    fp_b = evals["B"](bundle.model).top1
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dfq_distill_units_") as units:
        ctx = TrialContext(bundle.model, bundle.name, bundle.num_classes, bundle.preprocess.shape,
                           samples.calib, FidelityScorer(bundle.model, samples.heldout), reports=1,
                           preprocess=bundle.preprocess, heldout=samples.heldout, units=units)  # fmt: skip
        for seed in args.seeds:  # a seed's PTQ start is reconstructed once and reused by both distillations
            for name, config in configs(best, space).items():
                t0 = time.perf_counter()
                q = reconstruct({**config, "seed": seed}, ctx)
                r = {"seed": seed, "A": evals["A"](q).top1, "B": evals["B"](q).top1,
                     "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
                runs.setdefault(name, []).append(r)
                print(f"{name}, seed {seed}: {r}", flush=True)
    means = {name: sum(r["B"] for r in rs) / len(rs) for name, rs in runs.items()}
    for name, m in means.items():
        print(f"{name}: half-B mean {m:.2f} (FP {fp_b:.2f})")
    emit({"model": args.model, "fp_top1_B": fp_b, "search_s": round(search_s, 1),
          "best_trial": best["trial"], "best_top1_A": best["score"],
          "best_config": {k: v for k, v in json.loads(best["params"]).items() if k.startswith("distill.")},
          "runs": runs, "mean_top1_B": means,
          "best_gain_over_start_B": means["best"] - means["ptq start"],
          "defaults_gain_over_start_B": means["defaults"] - means["ptq start"],
          "best_minus_defaults_B": means["best"] - means["defaults"],
          "args": json.loads(json.dumps(vars(args), default=str))})  # fmt: skip


if __name__ == "__main__":
    main()
