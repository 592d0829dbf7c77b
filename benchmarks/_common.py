"""What the benchmarks share: where the reference data lies, and how results are printed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DFQ_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR_WEIGHTS = {
    "cifar_resnet20": "weights/resnet20-12fca82f.th",
    "cifar_resnet32": "weights/resnet32-d509ac18.th",
}
CIFAR_TEST = "cifar10/test"
CIFAR_TRAIN_5K = "cifar10/train-5k"  # the real-data reference only: no data-free method reads it


def shared(rel: str) -> Path:
    """A path under the reference data, or exit with a clear message when it is absent."""
    path = SHARED_DATA / rel
    if not path.exists():
        sys.exit(f"reference data not found: {path} (set DFQ_SHARED_DATA to the shared/data folder)")
    return path


def emit(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True))


def add_synth_args(p: argparse.ArgumentParser) -> None:
    """The direct synthesizer's flags (``--synth-iters``, ``--synth-batch``, ``--synth-set KEY=VALUE``)."""
    p.add_argument("--synth-iters", type=int, default=None, help="default: the synthesizer's")
    p.add_argument("--synth-batch", type=int, default=None, help="default: the synthesizer's")
    p.add_argument(
        "--synth-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="other DirectConfig fields, e.g. bn_relative=true lr=1.0 (the scale-free BN loss)",
    )


def synth_settings(args: argparse.Namespace) -> dict:
    """The DirectConfig fields the synthesizer's flags give (``--synth-iters``, ``--synth-batch``, and
    ``--synth-set KEY=VALUE``, each VALUE parsed as YAML: 0.25, false, 4); unknown fields refused."""
    import dataclasses

    import yaml

    from dfq_search.errors import refuse_unknown_keys
    from dfq_search.synth.direct import DirectConfig

    out = {k: v for k, v in {"iterations": args.synth_iters, "batch_size": args.synth_batch}.items() if v}
    for pair in args.synth_set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--synth-set takes KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    refuse_unknown_keys("DirectConfig", out, [f.name for f in dataclasses.fields(DirectConfig)])
    return out
