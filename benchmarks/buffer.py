"""Shared synthetic samples versus per-trial generation: 4 trials of one data-free run on ResNet-20.

Every trial runs the same data-free fine-tuning of the same round-to-nearest Q (``--method``'s preset,
``--iterations`` steps of ``--batch`` samples, the first ``--warmup`` generator-only), in three modes:

    own     each trial plays the whole game itself (generator and Q steps, as benchmarks/qat_cifar.py)
    shared  ``--workers`` Ray generator workers run the generator half once (the warm-up by one of
            them, which the others fork from; the kept steps split between them) and
            fill one sample buffer; each trial makes the same Q steps on buffer samples (P's logits
            come with them); the buffer is then spilled to a bank on disk
    bank    a second campaign: a fresh buffer loaded from that bank, no generation at all

For a preset whose generator loss does not read Q (gdfq, dsg, lrq) the shared run is the same
computation as the per-trial game, done once. Reported per mode: generator seconds per trial (wall, and CPU
seconds of the generator steps, which contention on a shared machine does not inflate), wall
seconds, buffer throughput (samples/s served to the trials) and each trial's top-1; then the
buffer's serving throughput for batches of 256. ``--codec-check`` measures what float16 and uint8
pixel storage cost (BN loss, P's logits, RTN-calibration top-1 on the stored samples).

    python benchmarks/buffer.py                                   # the full run (long on a CPU)
    python benchmarks/buffer.py --iterations 60 --warmup 10 --test-images 1000   # a quick check

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _common import CIFAR_TEST, CIFAR_WEIGHTS, emit, shared
from qat_cifar import METHODS, Timed, overrides

from dfq_search import distributed as dist
from dfq_search.bank import BankHeader, SourceTrainer, WorkerConfig, codec
from dfq_search.data import ImageData, load_image_folder
from dfq_search.evaluate import Evaluator
from dfq_search.fingerprint import model_fingerprint
from dfq_search.models import create_model
from dfq_search.qat import Game, load_config, start_q
from dfq_search.quant import PROTOCOLS, BitPlan, calibrate_, quantized_copy
from dfq_search.report import format_table
from dfq_search.synth import bn_loss, bn_statistics


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20", choices=list(CIFAR_WEIGHTS))
    p.add_argument(
        "--method", default="gdfq", choices=["gdfq", "dsg", "lrq"], help="a preset whose G ignores Q"
    )
    p.add_argument("--modes", nargs="+", default=["own", "shared", "bank"], choices=["own", "shared", "bank"])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--iterations", type=int, default=1200)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--q-lr", type=float, default=None)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides, key=value")
    p.add_argument("--workers", type=int, default=2, help="generator workers of the shared mode")
    p.add_argument("--serve-batches", type=int, default=40, help="batches of 256 in the throughput test")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on N strided test images")
    p.add_argument("--codec-check", action="store_true", help="measure float16 vs uint8 pixel storage")
    p.add_argument("--codec-samples", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def fresh_q(bundle, args, seed: int, device):
    plan = BitPlan.uniform(args.bits, args.bits)
    return start_q(bundle.model, plan, bundle.preprocess.shape, PROTOCOLS["generative"].config, "rtn",
                   seed=seed, device=device)  # fmt: skip


def own_trial(bundle, args, seed: int, device) -> tuple[torch.nn.Module, dict]:
    cfg = load_config(args.method, overrides(args, METHODS[args.method][1], seed))
    game = Game(bundle.model, fresh_q(bundle, args, seed, device), cfg, bundle.preprocess.shape,
                bundle.num_classes, device)  # fmt: skip
    game.g_step = timed = CpuTimed(game.g_step)
    game.run()
    return game.q, {"generator_s": sum(timed.seconds), "generator_cpu_s": timed.cpu, "serve_s": 0.0}


class CpuTimed(Timed):
    """qat_cifar's wall-clock timer, plus the CPU seconds of this thread (torch runs on 1 thread)."""

    def __init__(self, fn) -> None:
        super().__init__(fn)
        self.cpu = 0.0

    def __call__(self, *a):
        c = time.thread_time()
        out = super().__call__(*a)
        self.cpu += time.thread_time() - c
        return out


def buffer_trial(bundle, args, seed: int, device, buf) -> tuple[torch.nn.Module, dict]:
    """The game's Q steps, on buffer samples: same Q, optimiser, schedule and range tracking."""
    cfg = load_config(args.method, overrides(args, METHODS[args.method][1], seed))
    game = Game(bundle.model, fresh_q(bundle, args, seed, device), cfg, bundle.preprocess.shape,
                bundle.num_classes, device)  # fmt: skip
    serve = 0.0
    for _ in range(args.iterations - args.warmup):
        t = time.perf_counter()
        b = buf.sample(args.batch)
        x = b.x.to(device, torch.float32)
        serve += time.perf_counter() - t
        game.q_step(x, b.y.to(device), b.logits.to(device))
    return game.q, {"generator_s": 0.0, "generator_cpu_s": 0.0, "serve_s": serve}


def run_trials(mode: str, bundle, args, ev, device, buf=None) -> list[dict]:
    rows = []
    for seed in range(args.trials):
        t = time.perf_counter()
        q, info = (
            own_trial(bundle, args, seed, device)
            if buf is None
            else buffer_trial(bundle, args, seed, device, buf)
        )
        rows.append(
            {"mode": mode, "trial": seed, **info, "seconds": time.perf_counter() - t, "top1": ev(q).top1}
        )
        print(rows[-1], flush=True)
    return rows


def fill_shared(bundle, args) -> tuple[object, dict]:
    """Workers split the generator steps after one shared warm-up; returns (buffer, seconds)."""
    kept = args.iterations - args.warmup
    ovr = overrides(args, METHODS[args.method][1], 0)
    configs = [WorkerConfig(name=f"{args.method}-{i}", preset=args.method, overrides=ovr, seed=i,
                            steps=args.warmup + -(-kept // args.workers), keep_after=args.warmup,
                            chunk=4 * args.batch, publish_every=max(1, kept // 4))
               for i in range(args.workers)]  # fmt: skip
    shape = bundle.preprocess.shape
    buf = dist.SampleBuffer.start(
        "bench", kept * args.batch + args.workers * args.batch, shape, bundle.num_classes
    )
    pool = dist.WorkerPool(configs, bundle.model, shape, bundle.num_classes, buf, cpus_per_worker=1)
    pool.run()
    done = pool.wait()
    pool.shutdown()
    return buf, {"generator_s": sum(d["generator_seconds"] for d in done.values()),
                 "generator_cpu_s": sum(d["generator_cpu_seconds"] for d in done.values())}  # fmt: skip


def serving_throughput(buf, batches: int) -> float:
    buf.sample(256)  # warm
    t = time.perf_counter()
    for _ in range(batches):
        buf.sample(256).x.float()
    return batches * 256 / (time.perf_counter() - t)


def stored(x: torch.Tensor, encoding: str) -> torch.Tensor:
    """``x`` as read back from a bank shard in ``encoding`` (float32 = not stored)."""
    if encoding == "float32":
        return x
    raw, value_range = codec.encode(x, encoding)
    return codec.decode(raw, tuple(x.shape[1:]), encoding, value_range).float()


def codec_check(bundle, args, ev, device) -> dict:
    """BN loss, P's logits and RTN top-1 from the same samples in float32, float16 and uint8."""
    cfg = WorkerConfig(preset=args.method, overrides=[f"train.batch_size={args.batch}"])
    trainer = SourceTrainer(bundle.model, cfg, bundle.preprocess.shape, bundle.num_classes, device)
    for _ in range(args.warmup):
        trainer.step()
    x = torch.cat([trainer.step()[0].x for _ in range(-(-args.codec_samples // args.batch))]).to(device)
    out = {}
    with torch.no_grad():
        ref = bundle.model(x)
        for encoding, nbytes in (("float32", 4), ("float16", 2), ("uint8", 1)):
            xe = stored(x.cpu(), encoding).to(device)
            with bn_statistics(bundle.model) as stats:
                z = bundle.model(xe)
            q = quantized_copy(bundle.model, BitPlan.uniform(args.bits, args.bits), xe[:1],
                               PROTOCOLS["generative"].config)  # fmt: skip
            calibrate_(q, xe.split(64), device)
            out[encoding] = {"bn_loss": float(bn_loss(stats)),
                             "logit_max_abs_diff": float((z - ref).abs().max()),
                             "argmax_agree": float((z.argmax(1) == ref.argmax(1)).float().mean()),
                             "rtn_top1": ev(q).top1, "bytes_per_sample": x[0].numel() * nbytes}  # fmt: skip
            print(encoding, out[encoding], flush=True)
    return out


def summary(rows: list[dict], mode: str, wall: float, args, shared: dict | None = None) -> dict:
    """One mode's line; the shared generator seconds are spread over its trials."""
    mine, shared = [r for r in rows if r["mode"] == mode], shared or {}
    n, serve_s = len(mine), sum(r["serve_s"] for r in mine)
    served = n * (args.iterations - args.warmup) * args.batch / serve_s if serve_s else None
    gen = {
        k: statistics.fmean(r[k] for r in mine) + shared.get(k, 0.0) / n
        for k in ("generator_s", "generator_cpu_s")
    }
    return {"mode": mode, "trials": n, "wall_s": wall, "generator_s_per_trial": gen["generator_s"],
            "generator_cpu_s_per_trial": gen["generator_cpu_s"],
            "serve_s_per_trial": serve_s / n, "served_samples_per_s": served,
            "top1_mean": statistics.fmean(r["top1"] for r in mine),
            "top1": [r["top1"] for r in mine]}  # fmt: skip


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    bundle = create_model(args.model, shared(CIFAR_WEIGHTS[args.model]), device=device)
    test = load_image_folder(shared(CIFAR_TEST), bundle.preprocess)
    if args.test_images:
        step = max(1, len(test) // args.test_images)
        test = ImageData(test.images[::step], test.labels[::step], test.classes)
    ev = Evaluator(test, bundle.preprocess, reference=bundle.model, device=device)
    print(f"{args.model}: FP top-1 {ev(bundle.model).top1:.2f} on {len(test)} test images", flush=True)
    result, rows, modes = {"benchmark": "buffer", "args": vars(args)}, [], []
    if args.codec_check:
        result["codec"] = codec_check(bundle, args, ev, device)
    if "own" in args.modes:
        t = time.perf_counter()
        rows += run_trials("own", bundle, args, ev, device)
        modes.append(summary(rows, "own", time.perf_counter() - t, args))
    if "shared" in args.modes or "bank" in args.modes:
        modes += shared_and_bank(bundle, args, ev, device, rows, result)
    cols = ["mode", "trials", "wall_s", "generator_s_per_trial", "generator_cpu_s_per_trial",
            "serve_s_per_trial", "served_samples_per_s", "top1_mean"]  # fmt: skip
    print(format_table(modes, cols))
    emit({**result, "modes": modes, "trials": rows})


def shared_and_bank(bundle, args, ev, device, rows: list[dict], result: dict) -> list[dict]:
    dist.init(num_cpus=2)
    out, bank_dir = [], tempfile.mkdtemp(prefix="dfq_bank_")
    header = BankHeader(
        model_fingerprint(bundle.model), bundle.preprocess.shape, bundle.num_classes, args.model
    )
    t = time.perf_counter()
    buf, gen_s = fill_shared(bundle, args)
    if "shared" in args.modes:
        rows += run_trials("shared", bundle, args, ev, device, buf)
        out.append(summary(rows, "shared", time.perf_counter() - t, args, gen_s))
        result["serve_256_samples_per_s"] = serving_throughput(buf, args.serve_batches)
        print(f"buffer serving batches of 256: {result['serve_256_samples_per_s']:.0f} samples/s", flush=True)
    buf.spill(bank_dir, header)
    buf.kill()
    if "bank" in args.modes:
        t = time.perf_counter()
        second = dist.SampleBuffer.start("bench-from-bank", 10**6, header.image_shape, header.num_classes)
        result["bank_samples_loaded"] = second.load_bank(bank_dir, header.fingerprint)
        rows += run_trials("bank", bundle, args, ev, device, second)
        out.append(summary(rows, "bank", time.perf_counter() - t, args))
    dist.shutdown()
    return out


if __name__ == "__main__":
    main()
