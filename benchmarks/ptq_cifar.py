"""Post-training quantization of the CIFAR ResNets on synthetic images: RTN, BRECQ, ModCap, QDrop.

Protocol: PTQ (ALGORITHMS.md §0): first and last layer at 8 bits, MSE weight ranges, activation
ranges calibrated (``--act-range``) then learned; BN not folded. Synthetic images: direct image
optimisation of P (``dfq_search.synth.direct``), made once per (model, seed), shared by the rows and
cached on disk (``$DFQ_SEARCH_CACHE/synth``), so the table can be built over several runs.
Rows (each on ``--n-images`` images):

    rtn       calibrated ranges, round-to-nearest weights (no reconstruction)
    brecq     AdaRound + BRECQ block reconstruction (ModCap k = 0)
    modcapK   BRECQ + ModCap, the K adjacent pairs with the largest capacity gap reconstructed jointly
    qdrop     BRECQ with QDrop (keep the float activation with probability 0.5)
    real      the real-data reference: BRECQ on ``--n-images`` train-5k images (not data-free)
    real-rtn  the real-data reference without reconstruction

Columns: top-1 on the full JPEG test set, drop from FP, the oscillation figure of the per-unit
errors after reconstruction, seconds of synthesis and of calibration + reconstruction.
Figures are means over ``--seeds``. Example (the reduced table of the README):

    python benchmarks/ptq_cifar.py --models cifar_resnet20 --bits W4A4 --rows rtn brecq modcap1 real --seeds 0

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

import torch
from _common import CIFAR_TEST, CIFAR_TRAIN_5K, CIFAR_WEIGHTS, add_synth_args, emit, shared, synth_settings

from dfq_search.baselines import CalibSpec, calibration_batches
from dfq_search.cache import atomic_write, cache_dir
from dfq_search.data.folder import load_image_folder
from dfq_search.evaluate import Evaluator
from dfq_search.fingerprint import model_fingerprint
from dfq_search.models import create_model
from dfq_search.ptq import PTQConfig, ReconConfig, run_ptq
from dfq_search.quant import PROTOCOLS, parse_bits, trace_layers
from dfq_search.report import format_table

ROWS = ("rtn", "brecq", "modcap1", "modcap2", "modcap3", "qdrop", "real", "real-rtn")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(CIFAR_WEIGHTS), choices=list(CIFAR_WEIGHTS))
    p.add_argument("--bits", nargs="+", default=["W4A4", "W3A3", "W2A4"])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--n-images", type=int, default=1024)
    p.add_argument("--iters", type=int, default=ReconConfig.iters, help="reconstruction steps per unit")
    p.add_argument("--recon-batch", type=int, default=ReconConfig.batch_size)
    p.add_argument("--lr", type=float, default=ReconConfig.lr)
    p.add_argument("--act-lr", type=float, default=ReconConfig.act_lr)
    p.add_argument("--act-range", default=PTQConfig.act_range, choices=["minmax", "percentile", "mse"])
    p.add_argument("--bn-reestimate", action="store_true")
    p.add_argument("--capacity", default=PTQConfig.capacity, choices=["data", "free"])
    add_synth_args(p)
    p.add_argument(
        "--source",
        default="direct",
        choices=["direct", "generator"],
        help="synthetic images by direct optimisation of P, or from a generator trained against P",
    )
    p.add_argument(
        "--gen-preset",
        default="gdfq",
        choices=["gdfq", "dsg", "lrq"],
        help="the generator's preset (its source and sample losses), with --source generator",
    )
    p.add_argument("--gen-steps", type=int, default=600, help="generator training steps (--source generator)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def synthetic(bundle, n: int, seed: int, args, device) -> tuple[torch.Tensor, float]:
    """Synthetic images of P, cached on disk so that a table built over several runs shares them.

    Returns the images and the seconds their synthesis took (when they were made).
    """
    from dfq_search.synth.direct import DirectConfig, synthesize_images

    fingerprint = model_fingerprint(bundle.model)
    overrides = synth_settings(args)
    config = DirectConfig(**{**DirectConfig().__dict__, **overrides})
    # the whole resolved config is in the key, so a change of the synthesizer's defaults is a new entry
    key = json.dumps([bundle.name, fingerprint, n, seed, repr(config)])
    if args.source == "generator":
        key = json.dumps([bundle.name, fingerprint, n, seed, "generator", args.gen_preset, args.gen_steps])
    path = cache_dir() / "synth" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        print(f"synthetic images from the cache {path} (made in {saved['seconds']:.1f} s)", flush=True)
        return saved["images"], float(saved["seconds"])
    pre = bundle.preprocess
    t0 = time.perf_counter()
    if args.source == "generator":
        images = generator_images(bundle, n, seed, args, device)
    else:
        images, _ = synthesize_images(
            bundle.model, pre.shape, bundle.num_classes, n, seed=seed, device=device, preprocess=pre,
            config=config,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    atomic_write(path, lambda tmp: torch.save({"images": images, "seconds": seconds}, tmp))
    return images, seconds


def generator_images(bundle, n: int, seed: int, args, device) -> torch.Tensor:
    """``n`` images of a generator trained against P alone for ``--gen-steps`` steps (its preset's
    source and sample losses, as a generator worker trains it), drawn from the final generator in
    batches of its training batch size."""
    from dfq_search.bank import SourceTrainer, WorkerConfig

    config = WorkerConfig(name=args.gen_preset, preset=args.gen_preset, seed=seed, steps=args.gen_steps)
    trainer = SourceTrainer(bundle.model, config, bundle.preprocess.shape, bundle.num_classes, device)
    for step in range(args.gen_steps):
        _, losses = trainer.step()
        if (step + 1) % 100 == 0:
            print(f"  generator step {step + 1}/{args.gen_steps}: loss {losses['loss']:.3f}", flush=True)
    trainer.source.train()  # as the game and the workers sample it (batch statistics in its BN layers)
    gen, b = torch.Generator().manual_seed(seed + 1), trainer.game.train.batch_size
    with torch.no_grad():
        return torch.cat([trainer.source.sample(min(b, n - i), gen, device)[0] for i in range(0, n, b)]).cpu()


def row_config(row: str, args) -> PTQConfig:
    recon = ReconConfig(iters=args.iters, batch_size=args.recon_batch, lr=args.lr, act_lr=args.act_lr,
                        qdrop=0.5 if row == "qdrop" else 0.0)  # fmt: skip
    k = int(row[6:]) if row.startswith("modcap") else 0
    return PTQConfig(act_range=args.act_range, bn_reestimate=args.bn_reestimate, modcap_k=k,
                     capacity=args.capacity, reconstruct=not row.endswith("rtn"), recon=recon)  # fmt: skip


def run_model(name: str, args, device) -> tuple[dict, list[dict]]:
    bundle = create_model(name, shared(CIFAR_WEIGHTS[name]), device=device)
    test = load_image_folder(shared(CIFAR_TEST), bundle.preprocess)
    ev = Evaluator(test, bundle.preprocess, reference=bundle.model, device=device)
    fp = ev(bundle.model).top1
    layers = trace_layers(bundle.model, bundle.preprocess.example_input(device=device))
    runs: dict = {}
    for seed in args.seeds:
        synth, synth_s = (None, 0.0)
        if any(not r.startswith("real") for r in args.rows):
            synth, synth_s = synthetic(bundle, args.n_images, seed, args, device)
            print(f"{name} seed {seed}: synthesis {synth_s:.1f} s", flush=True)
        real = None
        if any(r.startswith("real") for r in args.rows):
            spec = CalibSpec(str(shared(CIFAR_TRAIN_5K)), args.n_images, 64, seed)
            real = list(calibration_batches(spec, bundle.preprocess, device))
        for bits in args.bits:
            plan = PROTOCOLS["ptq"].plan(layers, parse_bits(bits))
            for row in args.rows:
                data = real if row.startswith("real") else list(synth.to(device).split(64))
                torch.manual_seed(seed)
                res = run_ptq(bundle.model, plan, data, row_config(row, args), device=device)
                top1 = ev(res.model).top1
                rec = {"top1": top1, "drop": fp - top1, "oscillation": res.oscillation, "rise": res.rise,
                       "synth_s": 0.0 if row.startswith("real") else synth_s, "recon_s": res.seconds,
                       "groups": res.groups, "unit_errors": res.unit_errors}  # fmt: skip
                runs.setdefault((bits, row), []).append(rec)
                print(f"{name} {bits} {row} seed {seed}: top-1 {top1:.2f} (drop {fp - top1:.2f}), "
                      f"osc {res.oscillation:.4f}, recon {res.seconds:.1f} s", flush=True)  # fmt: skip
    table, out = [], {"fp_top1": fp, "rows": {}}
    for (bits, row), recs in runs.items():
        mean = {k: statistics.fmean(r[k] for r in recs) for k in ("top1", "drop", "oscillation", "rise",
                                                                 "synth_s", "recon_s")}  # fmt: skip
        out["rows"][f"{bits}/{row}"] = {**mean, "per_seed": recs}
        source = "train-5k" if row.startswith("real") else args.source
        table.append({"model": name, "bits": bits, "row": row, "source": source, **mean})
    return out, table


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for b in args.bits:
        parse_bits(b)  # bad bit widths are refused before any compute
    results, table = {}, []
    for name in args.models:
        results[name], rows = run_model(name, args, device)
        table += rows
    print(format_table(table), flush=True)
    emit({"benchmark": "ptq_cifar", "source": args.source, "args": vars(args),
          "threads": torch.get_num_threads(), "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
