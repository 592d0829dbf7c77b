"""Data-free post-training quantization of the model panel and the CIFAR ResNets, beside real data.

For every model (``--models``; the panel's weights from the zoo cache, ``benchmarks/zoo.py`` trains
them; the ResNets' from ``../shared/data/weights``) and bit width (``--bits``), PTQ protocol
(ALGORITHMS.md §0: first and last layer at 8 bits, MSE weight ranges, percentile activation ranges
then learned step sizes, BN not folded), rows (``--rows``):

    rtn      calibrated ranges on the synthetic images, round-to-nearest weights
    brecq    AdaRound + BRECQ block reconstruction on the synthetic images, guarded: ``run_ptq``
             keeps the RTN model when it is closer to P (the logits' MSE) on held-out synthetic
             images that no calibration saw
    modcap   BRECQ + ModCap, guarded, with k in {1, 2} chosen label-free: the k whose kept model
             is closer to P on the same held-out synthetic images
    real     the real-data reference: BRECQ on ``--n-images`` real training images (CIFAR:
             ``cifar10/train-5k``; MNIST: MNIST 5k's train split); not data-free

Synthetic images: direct optimisation of P (``dfq_search.synth.direct``, its defaults unless
``--synth-iters``/``--synth-batch``), ``--n-images`` for calibration and ``--heldout`` more (another
seed) for label-free choices, cached per (model, weights, synthesis config, seed) as
``ptq_cifar.py`` caches them. Top-1 on held-out real test images: the JPEG CIFAR-10 test set
(``--test-images`` of it, evenly spaced over the classes, when given) or MNIST 5k's test split.
Each figure is a mean over ``--seeds``. Example (the README's table, one model)::

    python benchmarks/panel.py --models mnist_dwnet --seeds 0 1

Prints one line per run, then a table (one row per model and bit width); the last line is JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import CIFAR_TEST, CIFAR_TRAIN_5K, CIFAR_WEIGHTS, add_synth_args, emit, shared
from ptq_cifar import row_config, synthetic

from dfq_search.data.folder import load_image_folder
from dfq_search.data.image_data import ImageData
from dfq_search.evaluate import Evaluator
from dfq_search.models import create_model
from dfq_search.models.zoo import RECIPES, load_split, zoo_weights
from dfq_search.ptq import ReconConfig, run_ptq
from dfq_search.quant import PROTOCOLS, parse_bits, trace_layers
from dfq_search.report import format_table

MODELS = (*CIFAR_WEIGHTS, *RECIPES)
ROWS = ("rtn", "brecq", "modcap", "real")
MODCAP_KS = (1, 2)
HELDOUT_SEED = 10_000  # held-out synthetic images: seed + this, never a calibration seed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--bits", nargs="+", default=["W4A4", "W3A3", "W2A4"])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--n-images", type=int, default=512, help="calibration images, synthetic and real")
    p.add_argument("--heldout", type=int, default=128, help="held-out synthetic images (ModCap's k)")
    p.add_argument("--iters", type=int, default=200, help="reconstruction steps per unit")
    p.add_argument("--test-images", type=int, default=None, help="CIFAR: score on this many test images")
    add_synth_args(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    # what ptq_cifar's row_config and synthetic read, at their defaults
    args.recon_batch, args.lr, args.act_lr = ReconConfig.batch_size, ReconConfig.lr, ReconConfig.act_lr
    args.act_range, args.bn_reestimate, args.capacity, args.source = "percentile", False, "data", "direct"
    return args


def spaced(data: ImageData, n: int | None) -> ImageData:
    """``n`` images of ``data`` evenly spaced over it (all when ``n`` is None or larger)."""
    if n is None or n >= len(data):
        return data
    idx = torch.linspace(0, len(data) - 1, n).round().long()
    return ImageData(data.images[idx], data.labels[idx], data.classes)


def load_model(name: str, device):
    """The bundle with its trained weights, and its (train, test) real images."""
    if name in CIFAR_WEIGHTS:
        bundle = create_model(name, shared(CIFAR_WEIGHTS[name]), device=device)
        train = load_image_folder(shared(CIFAR_TRAIN_5K), bundle.preprocess)
        test = load_image_folder(shared(CIFAR_TEST), bundle.preprocess)
        return bundle, train, test
    bundle = create_model(name, zoo_weights(name), device=device)
    return bundle, load_split(name, "train"), load_split(name, "test")


def real_batches(train: ImageData, n: int, seed: int, preprocess, device) -> list[torch.Tensor]:
    """``n`` training images drawn with ``seed``, normalized, in batches of 64."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return list(preprocess.normalize(train.images[pick]).to(device).split(64))


def ptq(bundle, plan, data, row: str, args, seed: int, device, heldout=None):
    torch.manual_seed(seed)
    return run_ptq(bundle.model, plan, data, row_config(row, args), device=device, heldout=heldout)


def run_model(name: str, args, device) -> tuple[dict, list[dict]]:
    bundle, train, test = load_model(name, device)
    test = spaced(test, args.test_images)
    ev = Evaluator(test, bundle.preprocess, reference=bundle.model, device=device)
    fp = ev(bundle.model).top1
    layers = trace_layers(bundle.model, bundle.preprocess.example_input(device=device))
    runs: dict = {}
    for seed in args.seeds:
        synth, synth_s, heldout = None, 0.0, None
        if any(r != "real" for r in args.rows):
            synth, synth_s = synthetic(bundle, args.n_images, seed, args, device)
            print(f"{name} seed {seed}: synthesis {synth_s:.1f} s", flush=True)
        if any(r in ("brecq", "modcap") for r in args.rows):
            heldout = synthetic(bundle, args.heldout, seed + HELDOUT_SEED, args, device)[0].to(device)
        for bits in args.bits:
            plan = PROTOCOLS["ptq"].plan(layers, parse_bits(bits))
            for row in args.rows:
                if row == "real":
                    data = real_batches(train, args.n_images, seed, bundle.preprocess, device)
                else:
                    data = list(synth.to(device).split(64))
                rec = run_row(bundle, plan, data, row, args, seed, device, heldout)
                rec.update(top1=ev(rec.pop("model")).top1, synth_s=0.0 if row == "real" else synth_s)
                runs.setdefault((bits, row), []).append(rec)
                print(
                    f"{name} {bits} {row} seed {seed}: top-1 {rec['top1']:.2f} (FP {fp:.2f}), k {rec['k']}, "
                    f"kept {rec['kept']}, recon {rec['recon_s']:.1f} s",
                    flush=True,
                )
    return summarize(name, fp, len(test), runs, args)


def run_row(bundle, plan, data, row: str, args, seed: int, device, heldout) -> dict:
    """One row's quantized model, its ModCap k (None outside ``modcap``), what the guard kept
    ("rtn" or "reconstructed"; None unguarded) and the seconds."""
    if row in ("rtn", "real"):
        res = ptq(bundle, plan, data, "rtn" if row == "rtn" else "brecq", args, seed, device)
        return {"model": res.model, "k": None, "kept": None, "recon_s": res.seconds, "rise": res.rise}
    ks = MODCAP_KS if row == "modcap" else (0,)
    tried = {
        k: ptq(bundle, plan, data, f"modcap{k}" if k else "brecq", args, seed, device, heldout) for k in ks
    }
    mse = {k: min(r.guard["rtn"], r.guard["reconstructed"]) for k, r in tried.items()}  # the kept model's
    k = min(mse, key=mse.get)
    res = tried[k]
    return {"model": res.model, "k": k if row == "modcap" else None, "kept": res.guard["kept"],
            "recon_s": sum(r.seconds for r in tried.values()), "rise": res.rise,
            "heldout_mse": {str(k): v for k, v in mse.items()}}  # fmt: skip


def summarize(name: str, fp: float, n_test: int, runs: dict, args) -> tuple[dict, list[dict]]:
    out = {"fp_top1": fp, "test_images": n_test, "rows": {}}
    by_bits: dict[str, dict] = {}
    for (bits, row), recs in runs.items():
        mean = {k: statistics.fmean(r[k] for r in recs) for k in ("top1", "synth_s", "recon_s", "rise")}
        out["rows"][f"{bits}/{row}"] = {**mean, "per_seed": recs}
        line = by_bits.setdefault(bits, {"model": name, "bits": bits, "FP": fp})
        line[row] = mean["top1"]
        if row == "modcap":
            line["k"] = "/".join(str(r["k"]) for r in recs)
        if row != "real":
            line["synth s"] = mean["synth_s"]
        line[f"{row} s"] = mean["recon_s"]
    for line in by_bits.values():
        for row in ("brecq", "modcap"):
            if row in line and "real" in line:
                line[f"real-{row}"] = line["real"] - line[row]
    return out, list(by_bits.values())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for b in args.bits:
        parse_bits(b)  # bad bit widths are refused before any compute
    results, table = {}, []
    for name in args.models:
        start = time.perf_counter()
        results[name], rows = run_model(name, args, device)
        results[name]["seconds"] = time.perf_counter() - start
        table += rows
    columns = ["model", "bits", "FP", *(r for r in ROWS if r in args.rows)]
    columns += [c for c in ("k", "real-brecq", "real-modcap", "synth s") if any(c in t for t in table)]
    columns += [f"{r} s" for r in ROWS if r in args.rows]
    subset = f" (CIFAR: {args.test_images} evenly spaced test images)" if args.test_images else ""
    print(f"top-1 % on held-out real test images{subset}, mean of seeds {args.seeds}")
    print(format_table(table, columns), flush=True)
    emit({"benchmark": "panel", "args": vars(args), "threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()
