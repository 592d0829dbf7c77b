"""What each ``dfq-search`` subcommand does, on parsed arguments (see :mod:`dfq_search.cli`)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from dfq_search.baselines import CalibSpec, round_to_nearest
from dfq_search.data.image_data import ImageData
from dfq_search.device import resolve_device
from dfq_search.errors import DfqError
from dfq_search.evaluate import Evaluator
from dfq_search.models import ModelBundle, create_model, list_models
from dfq_search.quant import BitPlan, get_protocol, model_cost, parse_bits, trace_layers
from dfq_search.report import format_table


@dataclass
class Setup:
    """A loaded model, its evaluation data (if any) and the device."""

    bundle: ModelBundle
    data: ImageData | None
    device: torch.device


def _setup(args: argparse.Namespace, need_data: bool = True) -> Setup:
    device = resolve_device(args.device)
    bundle = create_model(args.model, args.weights, args.num_classes, device)
    return Setup(bundle, _load_data(args, bundle) if need_data else None, device)


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


def _plan(args: argparse.Namespace, bundle: ModelBundle, bits: str | None = None) -> BitPlan:
    protocol = get_protocol(args.protocol)
    bits = bits or getattr(args, "bits", None)
    if getattr(args, "plan", None) is not None:
        if bits is not None:
            raise DfqError("both --plan and --bits given", bits, "one of them", "drop one")
        return BitPlan.load(args.plan)
    if bits is None:
        raise DfqError("no bit plan", None, "--plan FILE or --bits WxAy", "pass e.g. --bits W4A4")
    layers = trace_layers(bundle.model, bundle.preprocess.example_input(device=_device_of(bundle)))
    return protocol.plan(layers, parse_bits(bits))


def _device_of(bundle: ModelBundle) -> torch.device:
    return next(bundle.model.parameters()).device


def _quantize(args: argparse.Namespace, s: Setup, plan: BitPlan) -> nn.Module:
    calib = CalibSpec(args.calib, args.calib_images, 64, args.seed)
    config = get_protocol(args.protocol).config
    return round_to_nearest(s.bundle.model, plan, s.bundle.preprocess, calib, config, s.device)


def _cost_row(s: Setup, plan: BitPlan, config_input: bool = False) -> dict:
    example = s.bundle.preprocess.example_input(device=s.device)
    cost = model_cost(s.bundle.model, plan, example, config_input).summary()
    return {"size_KiB": cost["size_kib"], "MBOPs": cost["bops"] / 1e6, "mean_w_bits": cost["mean_w_bits"]}


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


def cmd_eval(args: argparse.Namespace) -> int:
    s = _setup(args)
    evaluator = Evaluator(s.data, s.bundle.preprocess, reference=s.bundle.model,
                          batch_size=args.batch_size, device=s.device)  # fmt: skip
    if args.checkpoint is not None:
        from dfq_search.checkpoint import load_quantized

        model, _ = load_quantized(args.checkpoint, s.device)
    elif args.plan is not None or args.bits is not None:
        model = _quantize(args, s, _plan(args, s.bundle))
    else:
        model = s.bundle.model
    result = evaluator(model)
    print(format_table([{"model": s.bundle.name, "images": result.n, "top1": result.top1,
                         "agreement": result.agreement, "seconds": result.seconds}]))  # fmt: skip
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from dfq_search.checkpoint import save_quantized

    s = _setup(args, need_data=not args.no_eval)
    plan = _plan(args, s.bundle)
    q = _quantize(args, s, plan)
    config = get_protocol(args.protocol).config
    path = save_quantized(args.out, q, s.bundle.name, s.bundle.num_classes, plan, config)
    row = {"model": s.bundle.name, **_cost_row(s, plan)}
    if s.data is not None:
        ev = Evaluator(s.data, s.bundle.preprocess, reference=s.bundle.model,
                       batch_size=args.batch_size, device=s.device)  # fmt: skip
        fp, res = ev(s.bundle.model), ev(q)
        row |= {"fp_top1": fp.top1, "top1": res.top1, "drop": fp.top1 - res.top1, "agreement": res.agreement}
    print(format_table([row]))
    print(f"wrote {path}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    """Uniform RTN plans on the model, accuracy before and after."""
    start = time.perf_counter()
    s = _setup(args)
    ev = Evaluator(s.data, s.bundle.preprocess, reference=s.bundle.model,
                   batch_size=args.batch_size, device=s.device)  # fmt: skip
    fp = ev(s.bundle.model)
    print(f"{s.bundle.name}: full precision top-1 {fp.top1:.2f}% on {fp.n} images "
          f"({args.protocol} protocol, RTN calibrated on {args.calib})", flush=True)  # fmt: skip
    rows = []
    for bits in args.bits:
        plan = _plan(args, s.bundle, bits)
        res = ev(_quantize(args, s, plan))
        rows.append({"plan": bits.upper(), "top1": res.top1, "drop": fp.top1 - res.top1,
                     "agreement": res.agreement, **_cost_row(s, plan)})  # fmt: skip
        print(f"  {bits.upper()}: top-1 {res.top1:.2f}%", flush=True)
    print(format_table(rows))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
