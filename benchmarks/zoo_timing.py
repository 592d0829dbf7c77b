"""Seconds per command for the classifiers users bring, at their own input size (224 for torchvision).

For each model (random weights: the timing does not depend on them; ``--weights`` is not needed):
``dfq-search layers`` (trace and cost), ``dfq-search eval`` (full precision on ``--images`` random
images), and one data-free trial, ``dfq-search quantize --method ptq`` (a campaign trial run once:
direct synthesis from the model's BN statistics, BRECQ reconstruction, the label-free score, the
checkpoint, its ONNX twin checked in onnxruntime, the evaluation). Settings are the flags below, kept
small so the CPU table fits in minutes; a row's seconds grow with ``--synth-iters`` and
``--recon-iters`` about linearly.

    python benchmarks/zoo_timing.py                        # the README table (CPU)
    python benchmarks/zoo_timing.py --models tv:resnet18 --device cuda

Prints one row per model and, last, a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from _common import emit

from dfq_search.cli import main
from dfq_search.models import create_model
from dfq_search.report import format_table

MODELS = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:efficientnet_b0",
          "tv:regnet_x_400mf", "timm:tf_efficientnet_lite0"]  # fmt: skip


def random_folder(root: Path, images: int, side: int) -> Path:
    """An ImageFolder of two classes of random RGB images of ``side`` pixels."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i in range(images):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (side, side, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def timed(argv: list[str]) -> tuple[float, str]:
    """Run one CLI command in this process; its wall seconds and what it printed (exit on failure)."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        sys.exit(f"{' '.join(argv[:3])} failed: {err.getvalue().strip()}")
    return time.perf_counter() - start, out.getvalue()


def table_row(out: str) -> dict[str, str]:
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return dict(zip(lines[head].split(), lines[head + 2].split(), strict=True))


def one_model(name: str, args: argparse.Namespace, data: Path, work: Path) -> dict:
    model = ["--model", name, "--device", args.device]
    layers_s, out = timed(["layers", *model, "--bits", args.bits])
    n_layers = sum(1 for line in out.splitlines()[2:] if line.strip())
    eval_s, out = timed(["eval", *model, "--data", str(data), "--batch-size", "32"])
    size = table_row(out)
    method = ["--method", "ptq", "--bits", args.bits, "--samples", "direct",
              "--calib-images", str(args.calib_images), "--heldout", str(args.heldout),
              "--recon-iters", str(args.recon_iters), "--set", f"direct.iterations={args.synth_iters}",
              f"ptq.recon.batch_size={args.batch}"]  # fmt: skip
    trial_s, out = timed(["quantize", *model, *method, "--data", str(data), "--out", str(work / "q.pt")])
    row = table_row(out)
    samples_s, method_s = float(row["samples_s"]), float(row["seconds"]) - float(row["samples_s"])
    return {
        "model": name,
        "layers": n_layers,
        "input": create_model(name).preprocess.input_size,
        "layers_s": round(layers_s, 2),
        "eval_s": round(eval_s, 2),
        "eval_images_per_s": round(int(size["images"]) / float(size["seconds"]), 1),
        "synthesis_s": round(samples_s, 1),
        "reconstruction_s": round(method_s, 1),
        "onnx_and_eval_s": round(trial_s - float(row["seconds"]), 1),
        "trial_s": round(trial_s, 1),
        "size_KiB": float(row["size_KiB"]),
        "onnx_agreement": float(row.get("onnx_agreement", "nan")),
    }


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--images", type=int, default=32, help="random evaluation images (default 32)")
    p.add_argument("--calib-images", type=int, default=32, help="synthetic calibration images")
    p.add_argument("--heldout", type=int, default=16, help="held-out synthetic images (score, guard)")
    p.add_argument("--synth-iters", type=int, default=20, help="direct synthesis steps per batch")
    p.add_argument("--recon-iters", type=int, default=20, help="reconstruction steps per unit")
    p.add_argument("--batch", type=int, default=16, help="reconstruction batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DFQ_SEARCH_CACHE"] = str(Path(tmp) / "cache")  # nothing cached between models or runs
        data = random_folder(Path(tmp) / "data", args.images, 256)
        for name in args.models:
            if name.startswith("timm:"):
                try:
                    import timm  # noqa: F401
                except ImportError:
                    print(f"skipped {name}: timm is not installed (pip install -e '.[timm]')", flush=True)
                    continue
            work = Path(tmp) / name.replace(":", "_")
            work.mkdir()
            rows.append(one_model(name, args, data, work))
            print(format_table(rows[-1:]), flush=True)
    print(format_table(rows))
    settings = {k: v for k, v in vars(args).items() if k != "models"}
    emit({"rows": rows, "settings": settings, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main_()
