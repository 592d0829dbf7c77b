"""The ``dfq-search`` command line: thin wrappers over the library.

Every user mistake raises :class:`DfqError`; ``main`` prints it on one line and exits with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL = "digits_cnn"
DEFAULT_BITS = ("W8A8", "W4A4", "W3A3")


def _add_preprocessing_args(p: argparse.ArgumentParser) -> None:
    """How images become the model's input (default: the model's own; a user's model: 32x32 RGB with
    ImageNet's mean/std); the channel count is the number of --mean values."""
    g = p.add_argument_group("preprocessing (default: the model's own)")
    g.add_argument("--input-size", type=int, help="side of the square input, e.g. 28 or 224")
    g.add_argument("--resize", type=int, help="shorter side before the center crop (e.g. 256 for 224)")
    g.add_argument(
        "--mean", type=float, nargs="+", help="per-channel mean, e.g. 0.1307 (one value: grayscale)"
    )
    g.add_argument("--std", type=float, nargs="+", help="per-channel std, as many values as --mean")


def _add_model_args(p: argparse.ArgumentParser, data_required: bool = False) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registered name (see 'dfq-search models'), 'tv:<torchvision name>' or "
                   "'package.module:function' (default: %(default)s, the embedded default)")  # fmt: skip
    p.add_argument("--weights", type=Path, help="weights file of the model (state dict)")
    p.add_argument("--num-classes", type=int, help="number of classes, if not the model's default")
    _add_preprocessing_args(p)
    p.add_argument("--data", type=Path,
                   help="labelled evaluation images, an ImageFolder directory "
                   "(default for digits_cnn: its held-out digits split)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", type=Path, help="bit plan YAML (rules by layer name, 're:' or _default)")
    p.add_argument("--bits", help="a uniform plan, e.g. W4A4 (with --protocol)")
    p.add_argument("--protocol", help="generative (all layers at the bits) or ptq (first/last layer at "
                   "8 bits, MSE weight ranges) (default: ptq with --method ptq or ptq+finetune, else "
                   "generative)")  # fmt: skip
    p.add_argument("--calib", help="round-to-nearest's calibration: 'gaussian' noise (default) or an "
                   "ImageFolder directory of real images (the real-data reference)")  # fmt: skip
    p.add_argument("--calib-images", type=int, default=256, help="calibration images (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")


def _add_bank_parsers(sub, add_model_args) -> None:
    """Add ``generate`` and ``bank`` to the CLI's sub-parsers; ``add_model_args`` adds --model etc."""
    gen = sub.add_parser("generate", help="build or extend a synthetic-sample bank for a model (resumable)")
    add_model_args(gen)
    gen.add_argument("--bank", required=True, help="bank location: a folder or a pyarrow URI (s3://...)")
    gen.add_argument(
        "--samples", type=int, default=10_000, help="samples per generator (default %(default)s)"
    )
    gen.add_argument(
        "--preset", default="gdfq", help="game preset whose generator half is run (gdfq, dsg, lrq)"
    )
    gen.add_argument("--seeds", type=int, nargs="+", default=[0], help="one generator per seed")
    gen.add_argument("--set", nargs="*", default=[], help="overrides of the preset, key=value")
    gen.add_argument("--batch-size-gen", type=int, help="generator batch size (default: the preset's)")
    gen.add_argument("--steps", type=int, help="generator steps (default: enough for --samples)")
    gen.add_argument("--keep-after", type=int, default=100, help="drop samples of the first N steps")
    gen.add_argument("--shard-rows", type=int, default=4096, help="samples per bank shard")
    gen.add_argument("--encoding", default="float16", choices=["float16", "uint8"], help="pixel storage")
    gen.add_argument("--workers", type=int, default=0, help="Ray generator workers (0: this process)")
    gen.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    gen.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    bank = sub.add_parser("bank", help="inspect a sample bank")
    bank_sub = bank.add_subparsers(dest="bank_command", metavar="ACTION", required=True)
    info = bank_sub.add_parser("info", help="header, samples per generator, published generator versions")
    info.add_argument("path", help="bank location: a folder or a pyarrow URI")
    info.add_argument("--verify", action="store_true", help="read every shard and check its checksum")


def _add_campaign_parsers(sub) -> None:
    """``run`` (the search campaign, the main job) and ``report`` (its tables and plots again)."""
    run = sub.add_parser("run", help="the main job: search per-layer bits and method settings under a "
                         "budget (Ray Tune + Optuna) and report the accuracy/size Pareto front")  # fmt: skip
    shipped = "search-space YAML, or a shipped name: default, cifar_resnet20, tiny_smoke"
    run.add_argument("--space", default="default", help=shipped)
    run.add_argument("--model", help="model (default: the space's model.name); see 'dfq-search models'")
    run.add_argument("--weights", help="weights file of the model (default: the space's model.weights)")
    run.add_argument("--num-classes", type=int, help="number of classes, if not the model's default")
    _add_preprocessing_args(run)
    run.add_argument("--storage", default="runs", help="where campaigns live: a folder (default runs/) "
                     "or a URI every node reaches, e.g. s3://bucket/prefix")  # fmt: skip
    run.add_argument("--name", help="campaign name (default: <model>-<space>-<hash of the settings>)")
    run.add_argument("--resume", action="store_true", help="continue the campaign of that name")
    run.add_argument("--address", help="Ray cluster address ('auto' on a cluster; default: a local Ray)")
    run.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    run.add_argument("--time-budget", type=float, help="seconds of trials; then it ends with the best so far")
    run.add_argument("--trials", type=int, help="number of trials (default: the space's search.trials)")
    run.add_argument("--concurrency", type=int, help="trials at a time (default: the space's)")
    run.add_argument("--sampler", help="Optuna sampler: tpe, random, nsga2, qmc, gp (default: the space's)")
    val = "labelled validation images (ImageFolder); the objective is then their top-1"
    run.add_argument("--val-data", type=Path, help=val)
    test = "labelled test images (ImageFolder): the front is scored on them, never searched on them"
    run.add_argument("--test-data", type=Path, help=test)
    run.add_argument("--device", default="cpu", help="device of the driver's preparation (trials use the "
                     "GPU Ray gives them)")  # fmt: skip
    rep = sub.add_parser("report", help="rebuild the tables and plots of a finished or running campaign")
    rep.add_argument("path", help="the campaign: <storage>/<name>, a folder or a URI")


def build_parser() -> argparse.ArgumentParser:
    from dfq_search.commands_quantize import add_method_args

    parser = argparse.ArgumentParser(
        prog="dfq-search",
        description="Data-free quantization of BatchNorm CNNs, and a search for per-layer bit widths. "
        "With no command: 'run' on the embedded default model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_campaign_parsers(sub)
    base = sub.add_parser("baseline", help="round-to-nearest at uniform plans: accuracy before and after")
    _add_model_args(base)
    base.add_argument("--bits", nargs="+", default=list(DEFAULT_BITS), help="uniform plans to try")
    base.add_argument("--protocol", default="generative", help="generative or ptq")
    base.add_argument("--calib", default="gaussian", help="'gaussian' or an ImageFolder directory")
    base.add_argument("--calib-images", type=int, default=256)
    base.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="top-1 of a model, full precision or quantized by a plan")
    _add_model_args(ev)
    _add_plan_args(ev)
    ev.add_argument("--checkpoint", type=Path, help="a quantized checkpoint from 'dfq-search quantize'")
    qz = sub.add_parser("quantize", help="quantize a model by a plan and save the checkpoint")
    _add_model_args(qz)
    _add_plan_args(qz)
    add_method_args(qz)
    qz.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    qz.add_argument("--no-eval", action="store_true", help="skip the evaluation of the result")
    qz.add_argument("--no-onnx", action="store_true", help="skip the ONNX file (--out with suffix .onnx, "
                    "checked in onnxruntime on --data)")  # fmt: skip
    ly = sub.add_parser("layers", help="the quantizable layers of a model, with their cost under a plan")
    _add_model_args(ly)
    _add_plan_args(ly)
    ml = sub.add_parser("models", help="list the registered models")
    ml.add_argument("pattern", nargs="?", help="a glob filter, e.g. 'cifar_*'")
    _add_bank_parsers(sub, _add_model_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads: idle OpenMP threads that spin slow a small or shared machine many-fold.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from dfq_search.errors import DfqError

    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["run", *(argv or [])])
    try:
        if args.command in ("generate", "bank"):
            from dfq_search import commands_bank as commands
        elif args.command in ("run", "report"):
            from dfq_search import commands_search as commands  # type: ignore[no-redef]
        else:
            from dfq_search import commands  # type: ignore[no-redef]

        return getattr(commands, f"cmd_{args.command}")(args)
    except DfqError as err:
        print(f"dfq-search: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfq-search: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
