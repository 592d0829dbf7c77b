"""Mixed-precision search on ResNet-20 (PTQ path): the best plan of a campaign against the uniform plan
and the sensitivity-DP plan of the same weight size, TPE against random sampling at equal trial counts,
and how well the label-free objective ranks plans (Kendall τ against real accuracy).

The campaign optimises top-1 on one half of the 10,000 CIFAR-10 test images (even indices: half A);
every accuracy reported here is on the other half (odd indices: half B), never seen by the search.
Budgets: the weight size of uniform b-bit weights (first/last layers at 8 bits, activations at 4);
with --bops also its BOPs, so that activation bits can be searched (--act-choices) at the same size and
compute as uniform WbA4.
The uniform and DP plans run as the campaign's first (warm-start) trials, with the same settings
(samples, reconstruction) as every searched plan. Campaigns live under --storage and are reused
when rerun, so the table can be built over several runs (rows, budgets, samplers, seeds by flags):

    python benchmarks/search_mixed_precision.py --budgets 3 --samplers tpe random --trials 24
    python benchmarks/search_mixed_precision.py --budgets 4 --samplers tpe
    python benchmarks/search_mixed_precision.py --budgets 3 --samplers tpe --bops --act-choices 3 4 5 6 8
    python benchmarks/search_mixed_precision.py --budgets 3 --samplers tpe --bops --bops-act-bits 3 \
        --act-choices 2 3 4 5 6 8

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_TEST, CIFAR_WEIGHTS, add_synth_args, emit, shared, synth_settings


def campaign_parser() -> argparse.ArgumentParser:
    """The flags that name a campaign (plan_seeds.py takes them too, to find the campaign again)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[3, 4], help="uniform weight bits of the budget")
    p.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="search seeds")
    p.add_argument("--iters", type=int, default=100, help="reconstruction steps per unit")
    p.add_argument("--calibration", type=int, default=512, help="synthetic calibration images")
    p.add_argument("--modcap-k", type=int, default=0, help="fixed ModCap k of every plan (0: BRECQ)")
    p.add_argument("--weight-choices", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8],
                   help="weight bits a layer may take (first/last layers stay at 8)")  # fmt: skip
    acts = "activation bits a layer may take (first/last at 8); other than 4 needs --bops"
    p.add_argument("--act-choices", type=int, nargs="+", default=[4], help=acts)
    bops = "also limit the BOPs to those of uniform W<budget>A<--bops-act-bits> (the same size and compute)"
    p.add_argument("--bops", action="store_true", help=bops)
    bops_a = "activation bits of the uniform plan whose BOPs --bops limits (3: W3A3's BOPs)"
    p.add_argument("--bops-act-bits", type=int, default=4, help=bops_a)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--reports", type=int, default=None,
                   help="reports per trial (the fidelities ASHA can stop a trial at; 1: no early stopping); "
                        "default: the space file's")  # fmt: skip
    p.add_argument("--eval-fraction", type=float, default=None,
                   help="part of half A an intermediate report scores (the last one scores all of it); "
                        "default: the space file's")  # fmt: skip
    p.add_argument("--storage", type=Path, default=Path("runs/benchmarks"))
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--warm-start", nargs="+", default=["uniform", "sensitivity", "hessian"],
                   help="warm starts (default: uniform, ZeroQ's DP and HAWQ-V3's ILP plan)")  # fmt: skip
    refine = "plans rerun with other seeds at the end (default: the space's; 0: none)"
    p.add_argument("--refine-top", type=int, default=None, help=refine)
    screen = "steps per unit of the reruns (above --iters: the trials are a screen, judged by the reruns)"
    p.add_argument("--refine-iters", type=int, default=None, help=screen)
    add_synth_args(p)
    return p


def parse_args() -> argparse.Namespace:
    return campaign_parser().parse_args()


def halves(data):
    """Even and odd images of the class-sorted test folder: two stratified halves."""
    from dfq_search.data.image_data import ImageData

    def take(idx):
        return ImageData(data.images[idx], data.labels[idx], data.classes)

    n = len(data.labels)
    import torch

    return take(torch.arange(0, n, 2)), take(torch.arange(1, n, 2))


def space_for(args, budget: int, sampler: str, seed: int):
    import yaml

    from dfq_search.search.space import SPACE_DIR, parse_space

    raw = yaml.safe_load((SPACE_DIR / "cifar_resnet20.yaml").read_text())
    raw["budget"] = {"uniform_weight_bits": budget, "repair": True}
    if args.bops:
        raw["budget"]["uniform_bops"] = f"W{budget}A{args.bops_act_bits}"
    raw["bits"]["weight"]["_default"] = list(args.weight_choices)
    raw["bits"]["activation"]["_default"] = list(args.act_choices)
    ptq = {**raw["method"]["ptq"], "modcap_k": args.modcap_k, "capacity": "data", "recon.iters": args.iters}
    if not args.modcap_k:  # capacity is read with modcap_k > 0 only: a knob no trial reads is refused
        del ptq["capacity"]
    raw["method"] = {"kind": "ptq", "ptq": ptq}
    raw["samples"]["calibration"] = args.calibration
    raw["samples"]["direct"] = {**raw["samples"].get("direct", {}), **synth_settings(args)}
    raw["search"] |= {"trials": args.trials, "sampler": sampler, "seed": seed,
                      "concurrency": args.concurrency, "warm_start": list(args.warm_start)}  # fmt: skip
    raw["objective"] |= {"metric": "top1"}
    if args.reports is not None:
        raw["objective"]["reports"] = args.reports
    if args.eval_fraction is not None:
        raw["objective"]["eval_fraction"] = args.eval_fraction
    if args.refine_top is not None:
        raw["search"]["refine_top"] = args.refine_top
    if args.refine_iters is not None:
        raw["search"]["refine_iters"] = args.refine_iters
    return parse_space(raw, f"cifar_resnet20-w{budget}-{sampler}-s{seed}")


def campaign_name(space) -> str:
    """The campaign folder of ``space``: named by a hash of what its trials depend on (the refinement
    settings are left out: changing them reruns the finalists only, in the same campaign)."""
    from dataclasses import asdict

    from dfq_search.fingerprint import config_hash

    trials = asdict(space)
    for key in ("refine_top", "refine_seeds", "refine_iters"):
        trials["search"].pop(key)
    return f"{space.source}-{config_hash(trials)[:8]}"


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's τ-b of two equally long lists (ties counted in neither pair class)."""
    con = dis = tx = ty = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                con += 1
            else:
                dis += 1
    denom = ((con + dis + tx) * (con + dis + ty)) ** 0.5
    return (con - dis) / denom if denom else float("nan")


def label_free_tau(rows: list[dict], bundle, heldout) -> tuple[dict[str, float], int]:
    """τ between each label-free objective on the held-out synthetic images and half-B top-1, over
    complete trials (one per plan, pooled over the campaigns of this run)."""
    from dfq_search.checkpoint import load_quantized
    from dfq_search.search.objective import LABEL_FREE, FidelityScorer

    scorer = FidelityScorer(bundle.model, heldout)
    plans = {r["plan"]: r for r in rows if r.get("test_top1") is not None}
    scores = [scorer(load_quantized(Path(r["checkpoint"]) / "model.pt")[0]) for r in plans.values()]
    top1 = [r["test_top1"] for r in plans.values()]
    signs = {"kl": -1.0, "mse": -1.0, "agreement": 1.0}  # each as maximised
    return {m: kendall_tau([signs[m] * s[m] for s in scores], top1) for m in LABEL_FREE}, len(plans)


def _uniform_dominated(result) -> str:
    """How many uniform warm-start plans a plan of the front beats on half B at no larger size."""
    uniform = [r for k, r in result.marks.items() if "uniform" in k and r.get("test_top1") is not None]
    front = [r for r in result.front if r.get("test_top1") is not None]
    beaten = sum(
        any(f["size_kib"] <= u["size_kib"] and f["test_top1"] > u["test_top1"] for f in front)
        for u in uniform
    )
    return f"{beaten}/{len(uniform)}"


def run(args, budget: int, sampler: str, seed: int, bundle, half_a, half_b) -> tuple[dict, list[dict]]:
    from dfq_search.search.campaign import CampaignOptions, run_campaign
    from dfq_search.search.results import best as best_trial
    from dfq_search.search.results import candidates

    space = space_for(args, budget, sampler, seed)
    weights = str(shared(CIFAR_WEIGHTS[args.model]))
    name = campaign_name(space)  # rerun: the same campaign, resumed or re-reported
    opts = CampaignOptions(space, args.model, weights, storage=args.storage, name=name,
                           resume=True, val_images=half_a, test_images=half_b)  # fmt: skip
    start = time.perf_counter()
    from dfq_search.distributed.runner import RayRunner

    result = run_campaign(opts, lambda line: print(line, flush=True), runner=RayRunner())
    _score_all_on_half_b(result, bundle, half_b)
    u_row = next((r for k, r in result.marks.items() if f"uniform-w{budget}" in k), {})
    dp_row = next((r for k, r in result.marks.items() if "sensitivity-dp" in k), {})
    ilp_row = next((r for k, r in result.marks.items() if "hessian-ilp" in k), {})
    uniform, dp = u_row.get("test_top1"), dp_row.get("test_top1")
    best = result.best or {}
    top_trial = best_trial(result.rows) or {}  # the highest single score (what an unrefined campaign ships)
    label = f"w{budget}" + (f"+bops-a{args.bops_act_bits}" if args.bops else "")
    row = {"budget": label, "sampler": sampler, "seed": seed,
           "trials": len(result.rows),
           "complete": len(candidates(result.rows)), "uniform_top1_B": uniform, "dp_top1_B": dp,
           "ilp_top1_B": ilp_row.get("test_top1"),
           "best_top1_B": best.get("test_top1"), "best_top1_A": best.get("score"),
           "best_size_kib": best.get("size_kib"), "best_refined_mean_A": best.get("refined_mean"),
           "best_mean_top1_B": _mean_on_half_b(result, best, bundle, half_b),
           "uniform_mean_top1_B": _mean_on_half_b(result, u_row, bundle, half_b),
           "dp_mean_top1_B": _mean_on_half_b(result, dp_row, bundle, half_b),
           "ilp_mean_top1_B": _mean_on_half_b(result, ilp_row, bundle, half_b),
           "top_trial_top1_B": top_trial.get("test_top1"), "top_trial_top1_A": top_trial.get("score"),
           "uniform_beaten_by_front": _uniform_dominated(result),
           "seconds": time.perf_counter() - start}  # fmt: skip
    return row, candidates(result.rows)


def _mean_on_half_b(result, best: dict, bundle, half_b) -> float | None:
    """Half-B top-1 of a refined plan (the best, a warm start) averaged over all its runs (the trial and
    its reruns): the plan's figure without the choice of its best seed."""
    from dfq_search.search.outputs import score_on_test
    from dfq_search.search.refine import reruns

    if not best.get("refined_runs"):
        return None
    trial = next(r for r in result.rows if r["trial"] == best["trial"])
    runs = [dict(r) for r in reruns(result.run_dir).get(best["trial"], [])]
    if not best.get("refined_screened"):  # a screened trial's own run is not part of the plan's figure
        runs.insert(0, dict(trial))
    score_on_test(runs, half_b, bundle)
    return sum(r["test_top1"] for r in runs) / len(runs)


def _score_all_on_half_b(result, bundle, half_b) -> None:
    """Half-B top-1 of every complete trial (for τ and the table); the front ones already have it."""
    from dfq_search.search.outputs import score_on_test
    from dfq_search.search.results import candidates

    missing = [r for r in candidates(result.rows) if r.get("test_top1") is None]
    if missing:
        score_on_test(missing, half_b, bundle)


def main() -> None:
    args = parse_args()
    if args.act_choices != [4] and not args.bops:
        sys.exit(
            "--act-choices other than 4 needs --bops: without a BOPs limit every plan would take "
            "the highest activation bits for free, and the uniform plan would not be W<budget>A4"
        )
    if args.bops_act_bits != 4 and not args.bops:
        sys.exit(f"--bops-act-bits {args.bops_act_bits} needs --bops: it sets the limit --bops adds")
    import torch

    torch.set_num_threads(1)
    from dfq_search.data.folder import load_image_folder
    from dfq_search.evaluate import Evaluator
    from dfq_search.models import create_model

    bundle = create_model(args.model, shared(CIFAR_WEIGHTS[args.model]))
    half_a, half_b = halves(load_image_folder(shared(CIFAR_TEST), bundle.preprocess))
    fp_b = Evaluator(half_b, bundle.preprocess).__call__(bundle.model).top1
    runs = [run(args, b, s, seed, bundle, half_a, half_b)
            for b in args.budgets for s in args.samplers for seed in args.seeds]  # fmt: skip
    from dfq_search.report import format_table
    from dfq_search.search.objective import DEFAULT_LABEL_FREE
    from dfq_search.search.samples import campaign_samples

    table = [row for row, _ in runs]
    heldout = campaign_samples(bundle, space_for(args, args.budgets[0], "tpe", 0).samples).heldout
    taus, n_tau = label_free_tau([r for _, done in runs for r in done], bundle, heldout)
    tau = taus[DEFAULT_LABEL_FREE]
    print(f"\nFP top-1 on half B: {fp_b:.2f}")
    print(format_table(table))
    shown = ", ".join(f"{m} {t:.3f}" for m, t in taus.items())
    print(f"label-free objectives on held-out synthetic images vs half-B top-1, Kendall tau over {n_tau} "
          f"plans: {shown} (the default: {DEFAULT_LABEL_FREE})")  # fmt: skip
    emit(
        {
            "model": args.model,
            "fp_top1_B": fp_b,
            "rows": table,
            "kendall_tau_label_free": tau,
            "kendall_tau_by_metric": taus,
            "tau_plans": n_tau,
            "args": json.loads(json.dumps(vars(args), default=str)),
        }
    )


if __name__ == "__main__":
    main()
