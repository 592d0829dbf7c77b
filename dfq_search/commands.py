"""What each ``dfq-search`` subcommand does, on parsed arguments (see :mod:`dfq_search.cli`)."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dfq_search.baselines import GAUSSIAN, CalibSpec, round_to_nearest
from dfq_search.data.image_data import ImageData
from dfq_search.device import resolve_device
from dfq_search.errors import DfqError
from dfq_search.evaluate import Evaluator
from dfq_search.models import ModelBundle, create_model, list_models
from dfq_search.models.preprocessing import given
from dfq_search.quant import BitPlan, get_protocol, model_cost, parse_bits, trace_layers
from dfq_search.report import format_table


@dataclass
class Setup:
    """A loaded model, its evaluation data (if any) and the device."""

    bundle: ModelBundle
    data: ImageData | None
    device: torch.device


def _check_batch_size(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise DfqError("--batch-size", args.batch_size, "an integer >= 1", "pass e.g. --batch-size 500")


def _setup(args: argparse.Namespace, need_data: bool = True) -> Setup:
    _check_batch_size(args)
    device = resolve_device(args.device)
    bundle = create_model(args.model, args.weights, args.num_classes, device, **preprocessing(args))
    return Setup(bundle, _load_data(args, bundle) if need_data else None, device)


def preprocessing(args: argparse.Namespace) -> dict:
    """The preprocessing flags the command was given (``--input-size``, ``--resize``, ``--mean``,
    ``--std``), by :func:`~dfq_search.models.create_model`'s names."""
    return given(vars(args))


def _load_data(args: argparse.Namespace, bundle: ModelBundle) -> ImageData:
    if args.data is not None:
        from dfq_search.data.folder import load_image_folder

        data = load_image_folder(args.data, bundle.preprocess)
    elif bundle.name == "digits_cnn":
        from dfq_search.data.digits import load_digits_split

        data = load_digits_split("test")
    else:
        raise DfqError(
            "no evaluation data", None, f"--data DIR (an ImageFolder) for model {bundle.name!r}",
            "pass --data path/to/images (root/<class>/<image>)",
        )  # fmt: skip
    if len(data.classes) > bundle.num_classes:
        raise DfqError(
            "the data has more classes than the model outputs", len(data.classes),
            f"at most {bundle.num_classes} class folders", "pass the right --data or --num-classes",
        )  # fmt: skip
    return data


def _protocol(args: argparse.Namespace) -> str:
    """``--protocol``, else the method's: ``ptq`` for a reconstruction, ``generative`` otherwise."""
    return args.protocol or ("ptq" if "ptq" in getattr(args, "method", "rtn") else "generative")


def _plan(args: argparse.Namespace, bundle: ModelBundle, bits: str | None = None) -> BitPlan:
    protocol = get_protocol(_protocol(args))
    bits = bits or getattr(args, "bits", None)
    if getattr(args, "plan", None) is not None:
        if bits is not None:
            raise DfqError("both --plan and --bits given", bits, "one of them", "drop one")
        plan = BitPlan.load(args.plan)
        plan.resolve([i.name for i in _layers(bundle)])  # names and patterns checked before any compute
        return plan
    if bits is None:
        raise DfqError("no bit plan", None, "--plan FILE or --bits WxAy", "pass e.g. --bits W4A4")
    return protocol.plan(_layers(bundle), parse_bits(bits))


def _layers(bundle: ModelBundle) -> list:
    return trace_layers(bundle.model, bundle.preprocess.example_input(device=_device_of(bundle)))


def _device_of(bundle: ModelBundle) -> torch.device:
    return next(bundle.model.parameters()).device


def _calib(args: argparse.Namespace) -> CalibSpec:
    """The calibration source, checked before any data is loaded."""
    args.calib = args.calib or GAUSSIAN
    if args.calib != GAUSSIAN and not Path(args.calib).expanduser().is_dir():
        raise DfqError(
            "calibration source not found", args.calib, f"{GAUSSIAN!r} or an ImageFolder directory",
            "pass --calib gaussian or an existing folder of images",
        )  # fmt: skip
    return CalibSpec(args.calib, args.calib_images, 64, args.seed)


def _check_out(path: Path) -> None:
    """Refuse an output file that cannot be written (before the work that produces it)."""
    if path.is_dir():
        raise DfqError("--out is a directory", str(path), "a file path", "pass e.g. --out model_w4.pt")
    parent = path.expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DfqError(
            "--out cannot be written", str(path), f"a path under a writable folder ({parent} is not one)",
            "pass --out in a folder you can write",
        )  # fmt: skip


def _quantize(args: argparse.Namespace, s: Setup, plan: BitPlan) -> nn.Module:
    calib = _calib(args)
    config = get_protocol(_protocol(args)).config
    return round_to_nearest(s.bundle.model, plan, s.bundle.preprocess, calib, config, s.device)


def _cost_row(s: Setup, plan: BitPlan, config_input: bool = False) -> dict:
    example = s.bundle.preprocess.example_input(device=s.device)
    cost = model_cost(s.bundle.model, plan, example, config_input).summary()
    return {
        "size_KiB": cost["size_kib"],
        "MBOPs": cost["bops"] / 1e6,
        "bits_per_param": cost["bits_per_param"],
    }


def cmd_models(args: argparse.Namespace) -> int:
    print("\n".join(list_models(args.pattern)))
    print("also: 'tv:<any torchvision classifier>' and 'package.module:function'")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    s = _setup(args, need_data=False)
    plan = _plan(args, s.bundle) if (args.plan or args.bits) else BitPlan({})
    example = s.bundle.preprocess.example_input(device=s.device)
    layers = {i.name: i for i in trace_layers(s.bundle.model, example)}
    rows = []
    for c in model_cost(s.bundle.model, plan, example).layers:
        info = layers[c.name]
        kind = "dwconv" if info.depthwise else info.kind
        rows.append({"layer": c.name, "kind": kind, "params": c.params, "MMACs": c.macs / 1e6,
                     "w_bits": c.w_bits, "a_bits": c.a_bits, "size_KiB": c.size_bits / 8192})  # fmt: skip
    print(format_table(rows))
    return 0


def _checkpoint_setup(args: argparse.Namespace) -> tuple[Setup, nn.Module, nn.Module | None]:
    """``eval --checkpoint``: the quantized model, and the model and input it was quantized for, as the
    checkpoint recorded them (``--model`` and the preprocessing flags may only repeat them); the
    full-precision reference for the agreement column when ``--weights`` gives its weights."""
    from dfq_search.checkpoint import load_quantized
    from dfq_search.cli import DEFAULT_MODEL
    from dfq_search.models.preprocessing import recorded

    if args.plan is not None or args.bits is not None:  # the checkpoint has its plan: they'd be ignored
        raise DfqError("--checkpoint with --plan/--bits", str(args.plan or args.bits),
                       "a checkpoint (it holds its own plan) or a plan, not both",
                       "drop --plan/--bits")  # fmt: skip
    device = resolve_device(args.device)
    model, meta = load_quantized(args.checkpoint, device)
    if args.model not in (DEFAULT_MODEL, meta["model"]):
        raise DfqError(
            "--model contradicts the checkpoint", args.model,
            f"the checkpoint's model {meta['model']!r} (or no --model)", "drop --model",
        )  # fmt: skip
    own = given(recorded(meta["preprocess"]))
    for key, value in preprocessing(args).items():
        if value != own.get(key):
            flag = f"--{key.replace('_', '-')}"
            raise DfqError(f"{flag} contradicts the checkpoint", value,
                           f"what it was quantized for: {own.get(key)}", f"drop {flag}")  # fmt: skip
    bundle = create_model(meta["model"], args.weights, meta["num_classes"], device, **own)
    has_own_weights = args.weights is not None or meta["model"] == DEFAULT_MODEL
    return Setup(bundle, None, device), model, bundle.model if has_own_weights else None


def cmd_eval(args: argparse.Namespace) -> int:
    _check_batch_size(args)
    plan = None
    if args.checkpoint is not None:
        s, model, reference = _checkpoint_setup(args)
    else:
        s = _setup(args, need_data=False)
        model = reference = s.bundle.model
        if args.plan is not None or args.bits is not None:
            plan, model = _plan(args, s.bundle), None
            _calib(args)
    s.data = _load_data(args, s.bundle)  # the inputs are checked first, then the images decoded
    evaluator = Evaluator(s.data, s.bundle.preprocess, reference=reference,
                          batch_size=args.batch_size, device=s.device)  # fmt: skip
    if plan is not None:
        model = _quantize(args, s, plan)
    result = evaluator(model)
    print(format_table([{"model": s.bundle.name, "images": result.n, "top1": result.top1,
                         "agreement": result.agreement, "seconds": result.seconds}]))  # fmt: skip
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from dfq_search.checkpoint import load_quantized, save_quantized
    from dfq_search.commands_quantize import check_method_args, method_of, real_images

    _check_out(args.out)
    check_method_args(args)
    s = _setup(args, need_data=False)
    plan = _plan(args, s.bundle)
    method = None if args.method == "rtn" else method_of(args)  # every setting checked before compute
    if method is None:
        _calib(args)
    s.data = None if args.no_eval else _load_data(args, s.bundle)
    row: dict = {"model": s.bundle.name, "method": args.method, **_cost_row(s, plan)}
    start = time.perf_counter()
    if method is None:
        q = _quantize(args, s, plan)
        config = get_protocol(_protocol(args)).config
        save_quantized(args.out, q, s.bundle.name, s.bundle.num_classes, plan, config, s.bundle.preprocess)
    else:
        from dataclasses import replace

        from dfq_search.commands_quantize import generator_bank
        from dfq_search.search.single import quantize_once

        if (bank := generator_bank(args, s.bundle, s.device)) is not None:
            method = replace(method, samples=replace(method.samples, bank=bank))

        log = lambda line: print(line, flush=True)  # noqa: E731
        got = quantize_once(s.bundle, plan, method, args.out, s.device, log,
                            real_images(args, s.bundle.preprocess))  # fmt: skip
        q, _ = load_quantized(args.out, s.device)
        m = got.metrics
        row |= {"agreement_P": m["agreement"], "kl_P": m["kl"], "mse_P": m["mse"], "samples_s": got.samples_s}
        if m.get("guard_kept") == "rtn":
            print("guard: the reconstruction was further from P on the held-out samples than "
                  "round-to-nearest; kept round-to-nearest", flush=True)  # fmt: skip
    row["seconds"] = time.perf_counter() - start
    if s.data is not None:
        ev = Evaluator(s.data, s.bundle.preprocess, reference=s.bundle.model,
                       batch_size=args.batch_size, device=s.device)  # fmt: skip
        fp, res = ev(s.bundle.model), ev(q)
        row |= {"fp_top1": fp.top1, "top1": res.top1, "drop": fp.top1 - res.top1, "agreement": res.agreement}
    onnx = _write_onnx(args, s, q, row)
    print(format_table([row]))
    if method is not None:
        print("agreement_P, kl_P, mse_P: fidelity to the full-precision model on the held-out samples "
              "(label-free); top1, agreement: on --data")  # fmt: skip
    print(f"wrote {args.out}" + (f" and {onnx}" if onnx else ""))
    return 0


def _write_onnx(args: argparse.Namespace, s: Setup, q: nn.Module, row: dict) -> Path | None:
    """The checkpoint's ONNX twin (``--out`` with the suffix .onnx; QDQ nodes), checked in onnxruntime
    against PyTorch on up to 500 of the --data images (``onnx_agreement``)."""
    if args.no_onnx:
        return None
    from dfq_search.export import check_onnx, export_onnx

    path = export_onnx(q, s.bundle.preprocess.example_input(device=s.device), args.out.with_suffix(".onnx"))
    if s.data is not None:
        images = s.data.subset(min(500, len(s.data)))
        check = check_onnx(q, path, (x for x, _ in images.batches(s.bundle.preprocess, 250, s.device)))
        row["onnx_agreement"] = 100 * check["top1_agreement"]
    return path


def cmd_baseline(args: argparse.Namespace) -> int:
    """Uniform RTN plans on the model, accuracy before and after."""
    start = time.perf_counter()
    s = _setup(args, need_data=False)
    plans = {bits: _plan(args, s.bundle, bits) for bits in args.bits}  # every plan checked first
    _calib(args)
    s.data = _load_data(args, s.bundle)
    ev = Evaluator(s.data, s.bundle.preprocess, reference=s.bundle.model,
                   batch_size=args.batch_size, device=s.device)  # fmt: skip
    fp = ev(s.bundle.model)
    print(f"{s.bundle.name}: full precision top-1 {fp.top1:.2f}% on {fp.n} images "
          f"({_protocol(args)} protocol, RTN calibrated on {args.calib})", flush=True)  # fmt: skip
    rows = []
    for bits, plan in plans.items():
        res = ev(_quantize(args, s, plan))
        rows.append({"plan": bits.upper(), "top1": res.top1, "drop": fp.top1 - res.top1,
                     "agreement": res.agreement, **_cost_row(s, plan)})  # fmt: skip
        print(f"  {bits.upper()}: top-1 {res.top1:.2f}%", flush=True)
    print(format_table(rows))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
