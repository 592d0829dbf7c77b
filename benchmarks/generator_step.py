"""What the sample losses and BN hooks cost: a generator step against the bare forward-backward.

For each preset's generator (its source, batch and sample-loss terms; terms that need Q are dropped,
since a generator worker has no Q), on ResNet-20 (or ``--model``):

    bare    z -> G -> P, loss = mean of P's logits, backward into G, Adam step (no hooks, no terms)
    step    ``SourceTrainer.step()``: the same, with the preset's loss terms over one hooked forward
            of P, plus detaching the samples and P's logits for the buffer

The two are timed interleaved (``--rounds`` rounds of ``--steps`` steps each, after ``--warmup``
steps), so load from other jobs hits both alike; the figure is median(bare) / median(step), the speed
of a generator step relative to the bare one (1.0 = free losses and hooks).

    python benchmarks/generator_step.py --presets gdfq dsg lrq --batch 32 256

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import CIFAR_WEIGHTS, emit, shared

from dfq_search.bank import SourceTrainer, WorkerConfig
from dfq_search.models import create_model
from dfq_search.report import format_table
from dfq_search.synth.losses import NEEDS_Q


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet20", choices=list(CIFAR_WEIGHTS))
    p.add_argument("--presets", nargs="+", default=["gdfq", "dsg", "lrq"])
    p.add_argument("--batch", nargs="+", type=int, default=[32])
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def trainer_for(bundle, preset: str, batch: int, device) -> SourceTrainer:
    probe = WorkerConfig(preset=preset).game_config().sample_loss.weights
    drop = [f"sample_loss.weights.{k}=0" for k, w in probe.items() if w > 0 and k in NEEDS_Q]
    cfg = WorkerConfig(name=preset, preset=preset, overrides=[f"train.batch_size={batch}", *drop])
    return SourceTrainer(bundle.model, cfg, bundle.preprocess.shape, bundle.num_classes, device)


def bare_step(trainer: SourceTrainer) -> None:
    """The generator step without loss terms or hooks: G and P forward, backward into G, Adam."""
    trainer.source.train()
    x, _ = trainer.source.sample(trainer.game.train.batch_size, trainer.gen, trainer.device)
    loss = trainer.p(x).mean()
    trainer.opt.zero_grad(set_to_none=True)
    loss.backward(inputs=list(trainer.source.parameters()))
    trainer.opt.step()


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def measure(bundle, preset: str, batch: int, args, device) -> dict:
    trainer = trainer_for(bundle, preset, batch, device)
    for _ in range(args.warmup):
        trainer.step()
        bare_step(trainer)
    bare, step = [], []
    for _ in range(args.rounds):
        bare.append(timed(lambda: bare_step(trainer), args.steps))
        step.append(timed(trainer.step, args.steps))
    b, s = statistics.median(bare), statistics.median(step)
    terms = sorted(trainer.objective.weights)
    row = {"preset": preset, "batch": batch, "terms": " ".join(terms), "bare_ms": 1000 * b,
           "step_ms": 1000 * s, "speed": b / s}  # fmt: skip
    print(row, flush=True)
    return row


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = create_model(args.model, shared(CIFAR_WEIGHTS[args.model]), device=device)
    rows = [measure(bundle, p, b, args, device) for p in args.presets for b in args.batch]
    print(format_table(rows))
    emit({"benchmark": "generator_step", "args": vars(args), "rows": rows,
          "min_speed": min(r["speed"] for r in rows)})  # fmt: skip


if __name__ == "__main__":
    main()
