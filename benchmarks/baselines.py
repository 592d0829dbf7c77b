"""Reference baselines on the real CIFAR ResNets: full precision and round-to-nearest (RTN).

RTN = min/max weight ranges per output channel, min/max activation ranges calibrated on either
Gaussian noise (data-free) or real ``train-5k`` images (the real-data reference); every figure is
the mean over ``--seeds`` calibration draws, evaluated on the full JPEG CIFAR-10 test set, and
reported beside the full-precision top-1 measured on the same images. Also times one evaluation of
the 10,000 test images, cold (JPEG decoding included, empty cache) and warm.

    python benchmarks/baselines.py                       # everything (about 15 minutes on 2 cores)
    python benchmarks/baselines.py --models cifar_resnet20 --rows W8A8 --calib real --seeds 0

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from unittest import mock

import torch
from _common import CIFAR_TEST, CIFAR_TRAIN_5K, CIFAR_WEIGHTS, emit, shared

from dfq_search.baselines import CalibSpec, round_to_nearest
from dfq_search.cache import CACHE_ENV
from dfq_search.data import folder
from dfq_search.evaluate import Evaluator
from dfq_search.models import create_model
from dfq_search.quant import BitPlan, QuantConfig, trace_layers
from dfq_search.quant.quantize import first_last_names
from dfq_search.report import format_table

# label -> (weight bits, activation bits, first and last layer at 8 bits)
ROWS = {
    "W8A8": (8, 8, False),
    "W4A4": (4, 4, False),
    "W4A4-fl8": (4, 4, True),
    "W2A4-fl8": (2, 4, True),
}
RTN_CONFIG = QuantConfig(weight_range="minmax", act_observer="minmax")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(CIFAR_WEIGHTS), choices=list(CIFAR_WEIGHTS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--calib", nargs="+", default=["gaussian", "real"], choices=["gaussian", "real"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def plan_for(model: torch.nn.Module, example: torch.Tensor, row: str) -> BitPlan:
    w, a, pin = ROWS[row]
    plan = BitPlan.uniform(w, a)
    if pin:
        names = first_last_names(trace_layers(model, example))
        plan = plan.with_rules({n: {"w": 8, "a": 8} for n in names})
    return plan


def timed_evaluations(bundle, device) -> tuple[Evaluator, dict]:
    """Cold (decode into an empty cache, then evaluate) and warm evaluation seconds."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {CACHE_ENV: tmp}):
        folder.clear_memo()
        t0 = time.perf_counter()
        data = folder.load_image_folder(shared(CIFAR_TEST), bundle.preprocess)
        decode = time.perf_counter() - t0
        ev = Evaluator(data, bundle.preprocess, reference=bundle.model, device=device)
        cold = time.perf_counter() - t0
    warm = ev(bundle.model).seconds
    return ev, {"decode_s": decode, "cold_eval_s": cold, "warm_eval_s": warm}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    results: dict = {}
    for name in args.models:
        bundle = create_model(name, shared(CIFAR_WEIGHTS[name]), device=device)
        ev, timing = timed_evaluations(bundle, device)
        fp = ev(bundle.model).top1
        example = bundle.preprocess.example_input(device=device)
        rows, res = [], {"fp_top1": fp, **timing, "rtn": {}}
        for row in args.rows:
            plan = plan_for(bundle.model, example, row)
            for calib in args.calib:
                source = "gaussian" if calib == "gaussian" else str(shared(CIFAR_TRAIN_5K))
                tops = []
                for seed in args.seeds:
                    spec = CalibSpec(source, args.calib_images, 64, seed)
                    q = round_to_nearest(bundle.model, plan, bundle.preprocess, spec, RTN_CONFIG, device)
                    tops.append(ev(q).top1)
                mean = statistics.fmean(tops)
                res["rtn"][f"{row}/{calib}"] = {"top1": mean, "drop": fp - mean, "per_seed": tops}
                rows.append({"model": name, "plan": row, "calib": calib, "top1": mean, "drop": fp - mean,
                             "min": min(tops), "max": max(tops)})  # fmt: skip
                print(f"{name} {row} {calib}: {mean:.2f} (drop {fp - mean:.2f})", flush=True)
        print(f"\n{name}: FP top-1 {fp:.2f}; one evaluation of {len(ev.data)} images: cold "
              f"{timing['cold_eval_s']:.1f} s (decode {timing['decode_s']:.1f} s), warm "
              f"{timing['warm_eval_s']:.1f} s")  # fmt: skip
        print(format_table(rows), "\n", flush=True)
        results[name] = res
    emit({"benchmark": "baselines", "calib_images": args.calib_images, "seeds": args.seeds,
          "threads": torch.get_num_threads(), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
