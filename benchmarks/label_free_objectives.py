"""How well label-free objectives rank quantized models: every model a `search_mixed_precision.py`
campaign kept (the complete trials' checkpoints and the refinement reruns), scored by fidelity to P on
several sets of unlabelled images, against real top-1 on half B of the CIFAR-10 test images (the half
no campaign optimised on). Kendall τ over all models, and averaged over the campaigns (a campaign
ranks only its own plans: that τ is what the search feels).

Objectives: −KL(P‖Q), agreement with P's top-1 and −MSE of the logits, on: the campaign's 256
held-out synthetic images (what `dfq-search run` uses without --val-data), its 512 calibration images
(in-sample), a fresh set of ``--fresh`` direct-synthesized images (another seed), and Gaussian noise.

    python benchmarks/label_free_objectives.py --fresh 1024

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_TEST, CIFAR_WEIGHTS, emit, shared
from search_mixed_precision import halves, kendall_tau

MIN_PER_CAMPAIGN = 4  # campaigns with fewer kept models do not enter the per-campaign mean


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", type=Path, default=Path("runs/benchmarks"), help="where the campaigns are")
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--fresh", type=int, default=1024, help="fresh direct-synthesized images (0: none)")
    p.add_argument("--noise", type=int, default=1024, help="Gaussian-noise images (0: none)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def kept_models(storage: Path, model: str) -> list[tuple[str, Path]]:
    """(campaign, model file) of every trial checkpoint and rerun of the model's campaigns."""
    out = []
    for run in sorted(storage.glob(f"{model}-*")):
        if not (run / "campaign.json").is_file():
            continue
        files = sorted(run.glob("trial_*/checkpoint_*/model.pt")) + sorted(run.glob("refine/*/model.pt"))
        out += [(run.name, f) for f in files]
    return out


def image_sets(args, bundle) -> dict[str, object]:
    """The unlabelled image sets, by name (P's input space)."""
    import torch

    from dfq_search.search.samples import campaign_samples
    from dfq_search.search.space import Samples

    campaign = campaign_samples(bundle, Samples(calibration=512, heldout=256, seed=0))  # DirectConfig's
    sets = {"heldout256": campaign.heldout, "calib512": campaign.calib}
    if args.fresh:  # another seed, cached like a campaign's samples
        fresh = campaign_samples(bundle, Samples(calibration=args.fresh, heldout=1, seed=7))
        sets[f"fresh{args.fresh}"] = fresh.calib
    if args.noise:
        gen = torch.Generator().manual_seed(11)
        sets[f"noise{args.noise}"] = torch.randn(args.noise, *bundle.preprocess.shape, generator=gen)
    return sets


def fidelity(scorer, q) -> dict[str, float]:
    """−KL(P‖Q), agreement (%) and −MSE of the logits (higher: closer to P), by the campaign's scorer."""
    r = scorer(q)
    return {"kl": -r["kl"], "agree": r["agreement"], "mse": -r["mse"]}


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from dfq_search.checkpoint import load_quantized
    from dfq_search.data.folder import load_image_folder
    from dfq_search.evaluate import Evaluator
    from dfq_search.models import create_model
    from dfq_search.search.objective import FidelityScorer

    bundle = create_model(args.model, shared(CIFAR_WEIGHTS[args.model]))
    half_a, half_b = halves(load_image_folder(shared(CIFAR_TEST), bundle.preprocess))
    evaluate = {h: Evaluator(d, bundle.preprocess) for h, d in (("A", half_a), ("B", half_b))}
    sets = image_sets(args, bundle)
    scorers = {name: FidelityScorer(bundle.model, x) for name, x in sets.items()}  # P's logits, once
    models = kept_models(args.storage, args.model)
    if not models:
        sys.exit(f"no kept models under {args.storage}: run search_mixed_precision.py first")
    rows = []
    for i, (campaign, path) in enumerate(models):
        q = load_quantized(path)[0]
        row = {
            "campaign": campaign,
            "model": str(path),
            **{f"top1_{h}": e(q).top1 for h, e in evaluate.items()},
        }
        for name, scorer in scorers.items():
            row |= {f"{k}@{name}": v for k, v in fidelity(scorer, q).items()}
        rows.append(row)
        print(f"{i + 1}/{len(models)} {campaign} top1_B {row['top1_B']:.2f} "
              f"kl@heldout256 {row['kl@heldout256']:.4f}", flush=True)  # fmt: skip
    proxies = [k for k in rows[0] if "@" in k]
    table = [{"objective": k, **_taus(rows, k, "A"), **_taus(rows, k, "B")} for k in proxies]
    table.sort(key=lambda r: -r["tau_campaign_mean_A"])
    print(
        f"\n{len(rows)} models of {len({r['campaign'] for r in rows})} campaigns; Kendall tau against top-1"
    )
    print(f"{'objective':<22} {'A: all':>7} {'A: campaign mean':>17} {'B: all':>7} {'B: campaign mean':>17}")
    for r in table:
        print(f"{r['objective']:<22} {r['tau_all_A']:7.3f} {r['tau_campaign_mean_A']:17.3f} "
              f"{r['tau_all_B']:7.3f} {r['tau_campaign_mean_B']:17.3f}")  # fmt: skip
    emit({"models": len(rows), "objectives": table, "fresh": args.fresh, "noise": args.noise, "rows": rows})


def _taus(rows: list[dict], key: str, half: str) -> dict:
    """τ of ``key`` against the ``half``'s top-1 over all rows, and its mean over the campaigns."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["campaign"], []).append(r)
    per = [
        kendall_tau([r[key] for r in rs], [r[f"top1_{half}"] for r in rs])
        for rs in by.values()
        if len(rs) >= MIN_PER_CAMPAIGN
    ]
    return {
        f"tau_all_{half}": kendall_tau([r[key] for r in rows], [r[f"top1_{half}"] for r in rows]),
        f"tau_campaign_mean_{half}": statistics.fmean(per) if per else float("nan"),
        "campaigns": len(per),
    }


if __name__ == "__main__":
    main()
