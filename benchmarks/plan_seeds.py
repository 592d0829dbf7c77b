"""How much of a plan's accuracy is the plan, and how much the reconstruction's seed: the warm starts
(uniform, sensitivity-DP) and the best plans of a `search_mixed_precision.py` campaign, each
reconstructed again with several seeds (the same trial code and settings as the campaign's), scored
on both halves of the CIFAR-10 test set (half A: what the search optimised; half B: never seen).

    python benchmarks/plan_seeds.py --budget 3 --sampler tpe --search-seed 0 --top 3 --seeds 0 1 2
    python benchmarks/plan_seeds.py --budget 3 --iters 200 --seeds 0 1    # longer reconstructions
    python benchmarks/plan_seeds.py --budget 3 --top 1 --seeds 0 1 2 3 --uniform 4 8   # + references

The campaign must exist under --storage (run `search_mixed_precision.py` with the same flags first):
every flag not listed here is the campaign's, as search_mixed_precision.py takes it (--bops,
--act-choices, --synth-set, --weight-choices, --storage, ...).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_TEST, CIFAR_WEIGHTS, emit, shared
from search_mixed_precision import campaign_name, campaign_parser, halves, space_for


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=3, help="the campaign's budget (uniform weight bits)")
    p.add_argument("--sampler", default="tpe", help="the campaign's sampler")
    p.add_argument("--search-seed", type=int, default=0, help="the campaign's search seed")
    p.add_argument("--top", type=int, default=3, help="best complete plans of the campaign (by half A)")
    p.add_argument("--skip", nargs="*", default=["uniform-w2/8"], help="warm starts left out, by name")
    p.add_argument("--uniform", type=int, nargs="*", default=[],
                   help="uniform plans at these weight bits too (references over the budget)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="reconstruction seeds")
    p.add_argument("--iters", type=int, default=None, help="steps per unit (default: the campaign's)")
    p.add_argument("--campaign-iters", type=int, default=100, help="the campaign's steps per unit")
    p.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="the campaign's samples file (its campaign.json names it; default: looked up in the cache)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args, rest = p.parse_known_args()
    campaign = campaign_parser().parse_args([*rest, "--iters", str(args.campaign_iters)])
    return argparse.Namespace(**{**vars(campaign), **vars(args)})  # this script's --seeds, --iters win


def campaign_plans(args, run_dir: Path) -> dict[str, dict]:
    """The warm starts by name, then the ``top`` best complete plans not among them."""
    import pyarrow.parquet as pq

    from dfq_search.search.results import candidates

    meta = json.loads((run_dir / "campaign.json").read_text())
    plans = {name: plan for name, plan in meta["warm_starts"].items() if name not in args.skip}
    rows = candidates(pq.read_table(run_dir / "results.parquet").to_pylist())
    rows.sort(key=lambda r: -r["score"])
    starts = dict(plans)
    seen = {json.dumps(p, sort_keys=True) for p in meta["warm_starts"].values()}
    for r in rows:
        plan = json.loads(r["plan"])
        if len(plans) - len(starts) >= args.top:
            break
        if json.dumps(plan, sort_keys=True) not in seen:
            seen.add(json.dumps(plan, sort_keys=True))
            plans[f"trial {r['trial']}"] = plan
    return plans


def reconstruct(config: dict, ctx) -> object:
    """Run the campaign's trial code on ``config``; the final quantized model."""
    from dfq_search.checkpoint import load_quantized
    from dfq_search.search.trial import run_trial

    out = {}

    def report(metrics: dict, folder: Path | None) -> None:
        if folder is not None:
            out["model"] = load_quantized(Path(folder) / "model.pt", ctx.device)[0]

    run_trial(config, ctx, report)
    return out["model"]


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from dfq_search.data.folder import load_image_folder
    from dfq_search.evaluate import Evaluator
    from dfq_search.models import create_model
    from dfq_search.quant import trace_layers
    from dfq_search.search.define import PlanSpace, SpaceFunction
    from dfq_search.search.objective import FidelityScorer
    from dfq_search.search.samples import campaign_samples
    from dfq_search.search.trial import TrialContext

    space_args = argparse.Namespace(**{**vars(args), "iters": args.campaign_iters, "concurrency": 2,
                                       "reports": None})  # fmt: skip
    space = space_for(space_args, args.budget, args.sampler, args.search_seed)
    run_dir = args.storage / campaign_name(space)
    if not (run_dir / "results.parquet").is_file():
        sys.exit(f"no campaign at {run_dir}: run search_mixed_precision.py with the same flags first")
    bundle = create_model(args.model, shared(CIFAR_WEIGHTS[args.model]), device=args.device)
    half_a, half_b = halves(load_image_folder(shared(CIFAR_TEST), bundle.preprocess))
    halves_ab = {"A": half_a, "B": half_b}
    evals = {h: Evaluator(d, bundle.preprocess, device=args.device) for h, d in halves_ab.items()}
    samples = (
        _saved_samples(args.samples) if args.samples else campaign_samples(bundle, space.samples, args.device)
    )
    plans_space = PlanSpace(
        space, trace_layers(bundle.model, bundle.preprocess.example_input(device=args.device))
    )
    base = SpaceFunction(plans_space)(_First())
    if args.iters is not None:
        base["ptq.recon.iters"] = args.iters
    ctx = TrialContext(bundle.model, bundle.name, bundle.num_classes, bundle.preprocess.shape,
                       samples.calib, FidelityScorer(bundle.model, samples.heldout, "kl"), reports=1,
                       device=args.device, preprocess=bundle.preprocess)  # fmt: skip
    plans = campaign_plans(args, run_dir)
    for w in args.uniform:
        ref = plans_space.uniform(w, 4)
        plans[f"uniform-w{w} (ref)"] = {n: {"w": b.w, "a": b.a} for n, b in ref.items()}
    runs: dict[str, list[dict]] = {name: [] for name in plans}
    for seed in args.seeds:  # seeds outside: a run cut short still has every plan at the first seeds
        for name, plan in plans.items():
            start = time.perf_counter()
            q = reconstruct({**base, "plan": plan, "seed": seed}, ctx)
            r = {"seed": seed, "A": evals["A"](q).top1, "B": evals["B"](q).top1,
                 "seconds": time.perf_counter() - start}  # fmt: skip
            runs[name].append(r)
            print(f"{name} seed {seed}: A {r['A']:.2f} B {r['B']:.2f} ({r['seconds']:.0f} s)", flush=True)
    rows = [_summary(name, plan, runs[name]) for name, plan in plans.items()]
    _print_table(rows)
    emit({"campaign": str(run_dir), "iters": base["ptq.recon.iters"], "seeds": args.seeds,
          "device": args.device, "plans": rows})  # fmt: skip


def _saved_samples(path: Path):
    import torch

    from dfq_search.search.samples import CampaignSamples

    saved = torch.load(path, weights_only=True)
    return CampaignSamples(saved["calib"], saved["heldout"], 0.0, f"file {path}")


class _First:
    """An Optuna-trial stand-in: the first choice of every parameter (the plan is replaced after)."""

    def suggest_categorical(self, name, choices):
        return choices[0]


def _summary(name: str, plan: dict, runs: list[dict]) -> dict:
    out = {"plan": name, "weight_bits": " ".join(str(b["w"]) for b in plan.values()), "runs": runs}
    for half in ("A", "B"):
        vals = [r[half] for r in runs]
        out[f"mean_{half}"] = statistics.fmean(vals)
        out[f"std_{half}"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'plan':<26} {'weight bits':<42} {'half A':>14} {'half B':>14}")
    for r in rows:
        print(f"{r['plan']:<26} {r['weight_bits']:<42} {r['mean_A']:6.2f} ± {r['std_A']:4.2f}  "
              f"{r['mean_B']:6.2f} ± {r['std_B']:4.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
