"""Data-free fine-tuning on the real CIFAR-10 ResNet-20: GDFQ, DSG, AdaDFQ, LRQ side by side.

Generative protocol (every layer quantized, the first and last included; min/max weight ranges per
channel; EMA activation ranges). Every method starts from the same round-to-nearest Q (ranges
calibrated on Gaussian noise) and gets the same budget: ``--iterations`` generator steps of
``--batch`` samples, the first ``--warmup`` of them generator-only. Rows:

    rtn          round-to-nearest, Gaussian calibration (the common start)
    gdfq dsg adadfq adasg lrq    the presets of dfq_search/qat/presets
    adadfq-lrq   AdaDFQ's game with LRQ's long-range generator
    real         the same Q steps (KD + CE) on real train-5k images: the upper reference

Columns: top-1 on the full (JPEG) test set, drop from FP, seconds, generator samples per second,
mean seconds per generator step and per Q step. Build the table over several runs:

    python benchmarks/qat_cifar.py --methods rtn gdfq adadfq --bits 4 --seeds 0 1
    python benchmarks/qat_cifar.py --methods adadfq --bits 3 --iterations 1500 --q-lr 1e-3

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import CIFAR_TEST, CIFAR_TRAIN_5K, CIFAR_WEIGHTS, emit, shared

from dfq_search.data import ImageData, load_image_folder
from dfq_search.evaluate import Evaluator
from dfq_search.models import create_model
from dfq_search.qat import Game, QLossParams, load_config, start_q
from dfq_search.qat.losses import q_objective
from dfq_search.quant import PROTOCOLS, BitPlan
from dfq_search.report import format_table

METHODS = {  # row -> (preset, extra overrides)
    "gdfq": ("gdfq", {}),
    "dsg": ("dsg", {}),
    "adasg": ("adasg", {}),
    "adadfq": ("adadfq", {}),
    "lrq": ("lrq", {}),
    "adadfq-lrq": ("adadfq", {"source": {"name": "lrq"}}),
}
ALL = ["rtn", *METHODS, "real"]
configs: dict[str, dict] = {}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20", choices=list(CIFAR_WEIGHTS))
    p.add_argument("--methods", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--iterations", type=int, default=1200)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--q-lr", type=float, default=None, help="Q's learning rate (default: the preset's)")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every method, key=value")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on N strided test images")
    p.add_argument(
        "--start",
        default="rtn",
        choices=["rtn", "track"],
        help="Q's start: RTN on Gaussian noise, or ranges tracked on the game's first samples",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def overrides(args: argparse.Namespace, extra: dict, seed: int) -> list[str]:
    out = [f"train.iterations={args.iterations}", f"train.warmup={args.warmup}",
           f"train.batch_size={args.batch}", f"train.seed={seed}", "train.log_every=0"]  # fmt: skip
    if args.q_lr is not None:
        out.append(f"train.q_lr={args.q_lr}")
    out += [f"source.{k}={v}" for k, v in extra.get("source", {}).items()]
    return out + list(args.set)


class Timed:
    """Wraps a bound method and keeps the wall seconds of each call."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, []

    def __call__(self, *a):
        t = time.perf_counter()
        out = self.fn(*a)
        self.seconds.append(time.perf_counter() - t)
        return out


def run_game(bundle, q, method: str, args, seed: int, device) -> dict:
    preset, extra = METHODS[method]
    cfg = load_config(preset, overrides(args, extra, seed))
    game = Game(bundle.model, q, cfg, bundle.preprocess.shape, bundle.num_classes, device)
    game.g_step, game.q_step = Timed(game.g_step), Timed(game.q_step)
    t0 = time.perf_counter()
    game.run()
    seconds = time.perf_counter() - t0
    configs[method] = cfg.to_dict()  # the fully resolved config goes into the JSON line
    return {"seconds": seconds, "samples_per_s": args.iterations * args.batch / seconds,
            "g_step_s": statistics.fmean(game.g_step.seconds),
            "q_step_s": statistics.fmean(game.q_step.seconds or [float("nan")])}  # fmt: skip


def run_real(bundle, q, args, seed: int, device) -> dict:
    """The same number of Q steps (KD + CE to the true labels, T = 20) on real train-5k images."""
    data = load_image_folder(shared(CIFAR_TRAIN_5K), bundle.preprocess)
    cfg = load_config("gdfq", overrides(args, {}, seed)).train
    params = [t for t in q.parameters() if t.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.q_lr, momentum=cfg.q_momentum, weight_decay=cfg.q_weight_decay,
                          nesterov=True)  # fmt: skip
    gen, times = torch.Generator().manual_seed(seed), []
    t0 = time.perf_counter()
    for _ in range(args.iterations - args.warmup):
        t = time.perf_counter()
        idx = torch.randint(len(data), (args.batch,), generator=gen)
        x = bundle.preprocess.normalize(data.images[idx].to(device))
        y = data.labels[idx].to(device)
        with torch.no_grad():
            z_p = bundle.model(x)
        loss, _ = q_objective({"kd": 1.0, "ce": 1.0}, z_p, q(x), y, QLossParams())
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        opt.step()
        times.append(time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "samples_per_s": None, "g_step_s": None, "q_step_s": statistics.fmean(times)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = create_model(args.model, shared(CIFAR_WEIGHTS[args.model]), device=device)
    test = load_image_folder(shared(CIFAR_TEST), bundle.preprocess)
    if args.test_images:  # every k-th image: all classes, unlike the first N of a class-sorted set
        step = max(1, len(test) // args.test_images)
        test = ImageData(test.images[::step], test.labels[::step], test.classes)
    ev = Evaluator(test, bundle.preprocess, reference=bundle.model, device=device)
    fp = ev(bundle.model).top1
    print(f"{args.model}: FP top-1 {fp:.2f} on {len(test)} test images", flush=True)
    protocol, rows, results = PROTOCOLS["generative"], [], {}
    for bits in args.bits:
        for method in args.methods:
            per_seed = []
            for seed in args.seeds:
                start = args.start if method in METHODS else "rtn"  # rtn and real need set ranges
                q = start_q(bundle.model, BitPlan.uniform(bits, bits), bundle.preprocess.shape,
                            protocol.config, start, seed=seed, device=device)  # fmt: skip
                info = {"seconds": 0.0, "samples_per_s": None, "g_step_s": None, "q_step_s": None}
                if method == "real":
                    info = run_real(bundle, q, args, seed, device)
                elif method != "rtn":
                    info = run_game(bundle, q, method, args, seed, device)
                per_seed.append({**info, "top1": ev(q).top1})
                print(f"W{bits}A{bits} {method} seed {seed}: {per_seed[-1]}", flush=True)
            row = {"plan": f"W{bits}A{bits}", "method": method}
            for key in ("top1", "seconds", "samples_per_s", "g_step_s", "q_step_s"):
                vals = [r[key] for r in per_seed if r[key] is not None]
                row[key] = statistics.fmean(vals) if vals else None
            row["drop"] = fp - row["top1"]
            rows.append(row)
            results[f"W{bits}A{bits}/{method}"] = {**row, "per_seed": per_seed}
    cols = ["plan", "method", "top1", "drop", "seconds", "samples_per_s", "g_step_s", "q_step_s"]
    print(format_table(rows, cols), flush=True)
    emit({"benchmark": "qat_cifar", "model": args.model, "fp_top1": fp, "iterations": args.iterations,
          "warmup": args.warmup, "batch": args.batch, "seeds": args.seeds, "q_lr": args.q_lr,
          "threads": torch.get_num_threads(), "test_images": len(test), "start": args.start,
          "configs": configs, "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
