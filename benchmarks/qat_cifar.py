"""Data-free fine-tuning on the real CIFAR-10 ResNet-20: GDFQ, DSG, AdaDFQ, LRQ side by side.

Generative protocol (every layer quantized, the first and last included; min/max weight ranges per
channel; EMA activation ranges). Every method starts from the same Q and gets the same budget:
``--iterations`` generator steps of ``--batch`` samples, the first ``--warmup`` of them generator-only.
Q's start (``--start``):

    rtn    round-to-nearest, ranges calibrated on Gaussian noise (the default)
    track  ranges left unset, tracked on the game's first samples (GDFQ's practice)
    ptq    post-training reconstruction (``run_ptq``: BRECQ, ``--ptq-iters`` steps per unit) on
           ``--ptq-images`` images synthesized by direct optimisation of P, every layer at the
           plan's bits (first and last included) but with MSE weight ranges (fixed: reconstruction
           needs them); with ``--heldout`` images, the round-to-nearest start instead when
           reconstruction lowers the logits' fidelity to P on them (run_ptq's guard). These images
           count against the sample budget: the game gets ceil(ptq_images / batch) fewer
           iterations, so every method sees at most iterations x batch synthetic samples in all.

Rows:

    rtn          round-to-nearest, Gaussian calibration
    ptq          the PTQ start alone (no game)
    gdfq dsg adadfq adasg lrq    the presets of dfq_search/qat/presets, from ``--start``
    adadfq-lrq   AdaDFQ's game with LRQ's long-range generator
    distill      end-to-end distillation of the PTQ start to P (``dfq_search.qat.distill``: KL on
                 flipped, shifted synthetic images, Adam, cosine) on ``--distill-pool`` direct-synthesis
                 images (the PTQ start's calibration images are the first ``--ptq-images`` of them),
                 ``--distill-set key=value`` for any DistillConfig setting; with ``--heldout`` images,
                 Q ends in its most faithful state on them (checked every ``check_every`` steps)
    real         the same Q steps (KD + CE) on real train-5k images from the same start (RTN when the
                 games' start is ``track``): the upper reference

Columns: top-1 on the full (JPEG) test set, drop from FP, seconds of the game, ``start_s`` (the PTQ
start's reconstruction, plus the synthesis of its images when made in this run: they are cached on
disk, shared with the search campaign's), generator samples per second, mean seconds per generator
step and per Q step, and a label-free fidelity on ``--heldout`` held-out synthetic images (direct
optimisation of P with another seed, never trained on): ``ho_kl`` = mean KL(P || Q) at T = 1,
``ho_agree`` = top-1 agreement with P in percent. ``--monitor-every K`` prints both every K
iterations: the criterion for choosing Q's learning rate and loss without labels (it favours the
PTQ start, whose calibration images come from the same synthesis). Build the table over several runs:

    python benchmarks/qat_cifar.py --methods rtn gdfq adadfq --bits 4 --seeds 0 1
    python benchmarks/qat_cifar.py --methods ptq adadfq --bits 3 --start ptq

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import statistics
import time

import torch
import torch.nn.functional as F
import yaml
from _common import CIFAR_TEST, CIFAR_TRAIN_5K, CIFAR_WEIGHTS, emit, shared

from dfq_search.data import ImageData, load_image_folder
from dfq_search.evaluate import Evaluator
from dfq_search.models import create_model
from dfq_search.ptq import PTQConfig, ReconConfig, run_ptq
from dfq_search.qat import DistillConfig, Game, QLossParams, distill, load_config, start_q
from dfq_search.qat.losses import q_objective
from dfq_search.quant import PROTOCOLS, BitPlan, LayerBits, trace_layers
from dfq_search.report import format_table
from dfq_search.search.samples import campaign_samples
from dfq_search.search.space import Samples
from dfq_search.synth.direct import DirectConfig

METHODS = {  # row -> (preset, extra overrides)
    "gdfq": ("gdfq", {}),
    "dsg": ("dsg", {}),
    "adasg": ("adasg", {}),
    "adadfq": ("adadfq", {}),
    "lrq": ("lrq", {}),
    "adadfq-lrq": ("adadfq", {"source": {"name": "lrq"}}),
}
ALL = ["rtn", "ptq", *METHODS, "distill", "real"]
configs: dict[str, dict] = {}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20", choices=list(CIFAR_WEIGHTS))
    p.add_argument("--methods", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--bits", nargs="+", type=plan_bits, default=[(4, 4), (3, 3)],
                   help="plans: 3 (W3A3) or W2A4 (2-bit weights, 4-bit activations)")  # fmt: skip
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
        choices=["rtn", "track", "ptq"],
        help="Q's start for the game rows: RTN on Gaussian noise, ranges tracked on the game's first "
        "samples, or PTQ reconstruction on synthetic images (see above)",
    )
    p.add_argument("--ptq-images", type=int, default=256, help="synthetic images of the PTQ start")
    p.add_argument("--ptq-iters", type=int, default=ReconConfig.iters, help="reconstruction steps per unit")
    p.add_argument("--synth-iters", type=int, default=DirectConfig.iterations, help="direct-synthesis steps")
    p.add_argument("--distill-pool", type=int, default=1024, help="images the distill row trains on")
    p.add_argument("--distill-set", nargs="*", default=[], help="DistillConfig settings, key=value (YAML)")
    p.add_argument("--heldout", type=int, default=256, help="held-out synthetic images (0: no fidelity)")
    p.add_argument("--monitor-every", type=int, default=0, help="print the held-out fidelity every K steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def plan_bits(text: str) -> tuple[int, int]:
    """'3' -> (3, 3); 'W2A4' -> (2, 4)."""
    m = re.fullmatch(r"(\d+)|[wW](\d+)[aA](\d+)", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a bit width (3) or a plan such as W2A4")
    return (int(m[1]), int(m[1])) if m[1] else (int(m[2]), int(m[3]))


def game_iterations(args: argparse.Namespace) -> int:
    """The game's iterations: the budget less the batches the PTQ start's images take (benchmarks that
    reuse this module, such as buffer.py, have no PTQ start)."""
    if getattr(args, "start", "rtn") != "ptq":
        return args.iterations
    return args.iterations - math.ceil(args.ptq_images / args.batch)


def overrides(args: argparse.Namespace, extra: dict, seed: int) -> list[str]:
    out = [f"train.iterations={game_iterations(args)}", f"train.warmup={args.warmup}",
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


class Fidelity:
    """Label-free fidelity of Q to P on held-out synthetic images: mean KL(P || Q) at T = 1 and
    top-1 agreement (percent). P's logits are computed once."""

    def __init__(self, p, images: torch.Tensor, batch: int = 128) -> None:
        self.batches = list(images.split(batch))
        with torch.no_grad():
            self.z_p = [p(x) for x in self.batches]

    @torch.no_grad()
    def __call__(self, q) -> dict[str, float]:
        kl = agree = n = 0.0
        for x, z_p in zip(self.batches, self.z_p, strict=True):
            z_q = q(x)
            log_p, log_q = F.log_softmax(z_p, 1), F.log_softmax(z_q, 1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            agree += float((z_p.argmax(1) == z_q.argmax(1)).sum())
            n += len(x)
        return {"ho_kl": kl / n, "ho_agree": 100 * agree / n}


def run_game(bundle, q, method: str, args, seed: int, device, fidelity: Fidelity | None) -> dict:
    preset, extra = METHODS[method]
    cfg = load_config(preset, overrides(args, extra, seed))
    game = Game(bundle.model, q, cfg, bundle.preprocess.shape, bundle.num_classes, device)
    game.g_step, game.q_step = Timed(game.g_step), Timed(game.q_step)
    every = args.monitor_every if fidelity is not None else 0
    t0, monitor_s = time.perf_counter(), 0.0
    while game.step < cfg.train.iterations:
        last = game.run(until=game.step + every if every else None)
        if every:
            t = time.perf_counter()
            on_g = {k: v for k, v in last.items() if k in ("q/loss", "q/agreement")}  # the last batch
            print(f"  step {game.step}: {fmt(fidelity(game.q))}, {fmt(on_g)}", flush=True)
            monitor_s += time.perf_counter() - t
    seconds = time.perf_counter() - t0 - monitor_s
    configs[method] = cfg.to_dict()  # the fully resolved config goes into the JSON line
    return {"seconds": seconds, "samples_per_s": cfg.train.iterations * args.batch / seconds,
            "g_step_s": statistics.fmean(game.g_step.seconds),
            "q_step_s": statistics.fmean(game.q_step.seconds or [float("nan")])}  # fmt: skip


def setting(text: str):
    """A ``--distill-set`` value: an int, a float (1e-4 too, which YAML reads as a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def run_distill(bundle, q, args, seed: int, starts: Starts, fidelity: Fidelity | None) -> dict:
    """The distill row: Q (the PTQ start) distilled to P on the synthetic pool."""
    settings = {k: setting(v) for k, _, v in (item.partition("=") for item in args.distill_set)}
    cfg = DistillConfig(**{"seed": seed, **settings})
    configs["distill"] = dataclasses.asdict(cfg)
    pool = starts.synthetic(seed)[0][: args.distill_pool]
    every = args.monitor_every if fidelity is not None else 0
    monitor = (lambda step, q: print(f"  step {step}: {fmt(fidelity(q))}", flush=True)) if every else None
    heldout = starts.synthetic(seed)[1] if args.heldout else None  # Q ends in its most faithful state
    info = distill(bundle.model, q, pool, cfg, monitor, every, heldout=heldout)
    print(f"  distill: {fmt(info)}", flush=True)
    return {"seconds": info["seconds"], "samples_per_s": None, "g_step_s": None,
            "q_step_s": info["seconds"] / cfg.steps, "kept_step": info.get("kept_step")}  # fmt: skip


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


def fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in d.items())


class Starts:
    """Q's starts, made once per (bits, seed) and copied for each row; the synthetic images per seed."""

    def __init__(self, bundle, args, device) -> None:
        self.bundle, self.args, self.device = bundle, args, device
        self.layers = trace_layers(bundle.model, bundle.preprocess.example_input(device=device))
        self.samples: dict[int, tuple] = {}
        self.ptq: dict[tuple[int, int], tuple] = {}

    def synthetic(self, seed: int):
        """(calibration images, held-out images, seconds of synthesis; 0 when read from the cache)."""
        if seed not in self.samples:
            a = self.args
            pool = a.distill_pool if "distill" in a.methods else 0
            cfg = Samples(source="direct", calibration=max(a.ptq_images, pool, 1), heldout=max(a.heldout, 1),
                          direct=DirectConfig(iterations=a.synth_iters), seed=seed)  # fmt: skip
            s = campaign_samples(self.bundle, cfg, self.device)
            print(f"seed {seed}: synthetic images: {s.origin}", flush=True)
            self.samples[seed] = (s.calib.to(self.device), s.heldout.to(self.device), s.seconds)
        return self.samples[seed]

    def fidelity(self, seed: int) -> Fidelity | None:
        return Fidelity(self.bundle.model, self.synthetic(seed)[1]) if self.args.heldout else None

    def make(self, start: str, bits: tuple[int, int], seed: int) -> tuple:
        """(Q, seconds its start took) for ``start`` in rtn / track / ptq."""
        if start != "ptq":
            q = start_q(self.bundle.model, BitPlan.uniform(*bits), self.bundle.preprocess.shape,
                        PROTOCOLS["generative"].config, start, seed=seed, device=self.device)  # fmt: skip
            return q, 0.0
        if (bits, seed) not in self.ptq:
            calib, heldout, synth_s = self.synthetic(seed)
            calib = calib[: self.args.ptq_images]
            # every layer at the bits (generative plan), weight ranges MSE-searched and fixed
            plan = PROTOCOLS["generative"].plan(self.layers, LayerBits(*bits))
            qcfg = dataclasses.replace(PROTOCOLS["generative"].config, weight_range="mse")
            cfg = PTQConfig(recon=ReconConfig(iters=self.args.ptq_iters, seed=seed))
            torch.manual_seed(seed)
            # the guard keeps the RTN start if reconstruction loses fidelity on the held-out images
            res = run_ptq(self.bundle.model, plan, list(calib.split(64)), cfg, qcfg, self.device,
                          heldout=heldout if self.args.heldout else None)  # fmt: skip
            print(f"W{bits[0]}A{bits[1]} PTQ start seed {seed}: {res.seconds:.1f} s "
                  f"(+ synthesis {synth_s:.1f} s), guard {res.guard}", flush=True)  # fmt: skip
            self.ptq[(bits, seed)] = (res.model, res.seconds + synth_s)
        q, seconds = self.ptq[(bits, seed)]
        return copy.deepcopy(q), seconds


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
    if game_iterations(args) <= args.warmup:
        raise SystemExit(f"--iterations {args.iterations} leaves no Q step after the PTQ images and warm-up")
    starts, rows, results = Starts(bundle, args, device), [], {}
    keys = ("top1", "seconds", "start_s", "samples_per_s", "g_step_s", "q_step_s", "ho_kl", "ho_agree")
    for bits in args.bits:
        for method in args.methods:
            per_seed = []
            for seed in args.seeds:
                # the ptq row is the PTQ start alone; real fine-tunes the games' start (set ranges: not track)
                start = "ptq" if method == "ptq" else args.start if method in METHODS else "rtn"
                if method == "distill" or (method == "real" and args.start == "ptq"):
                    start = "ptq"
                q, start_s = starts.make(start, bits, seed)
                fidelity = starts.fidelity(seed)
                info = {"seconds": 0.0, "samples_per_s": None, "g_step_s": None, "q_step_s": None}
                if method == "real":
                    info = run_real(bundle, q, args, seed, device)
                elif method == "distill":
                    info = run_distill(bundle, q, args, seed, starts, fidelity)
                elif method in METHODS:
                    info = run_game(bundle, q, method, args, seed, device, fidelity)
                per_seed.append({**info, "start_s": start_s, "top1": ev(q).top1,
                                 **(fidelity(q) if fidelity else {})})  # fmt: skip
                print(f"W{bits[0]}A{bits[1]} {method} seed {seed}: {per_seed[-1]}", flush=True)
            row = {"plan": f"W{bits[0]}A{bits[1]}", "method": method, "start": start}
            for key in keys:
                vals = [r[key] for r in per_seed if r.get(key) is not None]
                row[key] = statistics.fmean(vals) if vals else None
            row["drop"] = fp - row["top1"]
            rows.append(row)
            results[f"W{bits[0]}A{bits[1]}/{method}"] = {**row, "per_seed": per_seed}
    cols = ["plan", "method", "start", "top1", "drop", "seconds", "start_s", "samples_per_s", "g_step_s",
            "q_step_s", "ho_kl", "ho_agree"]  # fmt: skip
    print(format_table(rows, cols), flush=True)
    emit({"benchmark": "qat_cifar", "model": args.model, "fp_top1": fp, "iterations": args.iterations,
          "game_iterations": game_iterations(args), "warmup": args.warmup, "batch": args.batch,
          "seeds": args.seeds, "q_lr": args.q_lr, "threads": torch.get_num_threads(),
          "test_images": len(test), "start": args.start, "ptq_images": args.ptq_images,
          "ptq_iters": args.ptq_iters, "heldout": args.heldout, "set": args.set,
          "distill_pool": args.distill_pool, "distill_set": args.distill_set,
          "configs": configs, "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
