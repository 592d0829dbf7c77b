"""``dfq-search quantize --method ptq|finetune|ptq+finetune``: the data-free methods in one command
(:mod:`dfq_search.search.single`, a campaign trial run once). ``--method rtn`` stays in
:mod:`dfq_search.commands`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml

from dfq_search.errors import DfqError

SAMPLE_SOURCES = "direct, generator[:PRESET], gaussian, bank:DIR or real:DIR"
GENERATOR_WARMUP = 100  # generator steps whose samples are dropped (as a campaign's samples.keep_after)
# the flags that only a data-free method reads: refused with --method rtn (they would be ignored)
METHOD_FLAGS = ("samples", "modcap_k", "recon_iters", "finetune_preset", "finetune_iters", "set", "heldout")


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method (default rtn: round-to-nearest, calibrated by --calib)")
    methods = ["rtn", "ptq", "finetune", "ptq+finetune", "ptq+distill"]
    g.add_argument("--method", default="rtn", choices=methods,
                   help="ptq: AdaRound/BRECQ reconstruction (ModCap with --modcap-k); finetune: "
                   "a data-free game (--finetune-preset); ptq+finetune: the game after ptq; ptq+distill: "
                   "end-to-end distillation to P on the samples after ptq (--set distill.*)")  # fmt: skip
    g.add_argument("--samples", help=f"what the method calibrates on: {SAMPLE_SOURCES} (default "
                   "direct: images synthesized from the model's BN statistics; real:DIR: the real-data "
                   "reference)")  # fmt: skip
    g.add_argument("--modcap-k", type=int, help="ModCap's joint unit pairs (default 0: BRECQ)")
    g.add_argument("--recon-iters", type=int, help="reconstruction steps per unit (default: ReconConfig's)")
    g.add_argument("--finetune-preset", help="adadfq (default), gdfq, dsg, adasg or lrq")
    g.add_argument("--finetune-iters", type=int, help="steps of the game, warm-up included (required with "
                   "finetune: the presets' own are the papers' 80,000)")  # fmt: skip
    g.add_argument("--heldout", type=int, help="held-out samples for the label-free score and PTQ's guard "
                   "(default 256)")  # fmt: skip
    g.add_argument("--set", nargs="+", metavar="PATH=VALUE", help="any other setting by path: ptq.<path of "
                   "PTQConfig>, finetune.<path of the game's config>, distill.<DistillConfig field>, "
                   "direct.<DirectConfig field>, e.g. ptq.recon.qdrop=0.5 finetune.train.q_lr=1e-5 "
                   "distill.lr=1e-4 direct.bn_relative=true")  # fmt: skip


def check_method_args(args: argparse.Namespace) -> None:
    """Refuse flags the chosen method would ignore, before any compute."""
    if args.method == "rtn":
        given = [f for f in METHOD_FLAGS if getattr(args, f) is not None]
        if given:
            flag = f"--{given[0].replace('_', '-')}"
            raise DfqError(f"{flag} with --method rtn", getattr(args, given[0]),
                           "method flags with --method ptq, finetune, ptq+finetune or ptq+distill",
                           f"drop {flag}, or pass --method ptq")  # fmt: skip
    elif args.calib is not None:
        raise DfqError(f"--calib with --method {args.method}", args.calib,
                       "--calib only with --method rtn; a data-free method calibrates on --samples",
                       "pass --samples real:DIR for real images, or drop --calib")  # fmt: skip


def _overrides(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"ptq": {}, "finetune": {}, "distill": {}, "direct": {}}
    for pair in pairs or []:
        key, eq, raw = pair.partition("=")
        part, dot, path = key.partition(".")
        if not eq or not dot or part not in out or not path:
            raise DfqError("--set", pair, "PART.PATH=VALUE with PART ptq, finetune, distill or direct",
                           "e.g. --set ptq.recon.qdrop=0.5")  # fmt: skip
        out[part][path] = yaml.safe_load(raw)
    return out


def method_of(args: argparse.Namespace) -> Any:
    """The :class:`~dfq_search.search.single.Method` the flags ask for (validated)."""
    from dfq_search.search.single import Method
    from dfq_search.search.space import Samples
    from dfq_search.synth.direct import DirectConfig

    sets = _overrides(args.set)
    ptq = {**({"modcap_k": args.modcap_k} if args.modcap_k is not None else {}),
           **({"recon.iters": args.recon_iters} if args.recon_iters is not None else {}),
           **sets["ptq"]}  # fmt: skip
    fine = {**({"preset": args.finetune_preset} if args.finetune_preset else {}),
            **({"train.iterations": args.finetune_iters} if args.finetune_iters is not None else {}),
            **sets["finetune"]}  # fmt: skip
    source = args.samples or "direct"
    kind, _, where = source.partition(":")
    needs = kind in ("bank", "real")
    if kind not in ("direct", "generator", "gaussian", "bank", "real") or (
        bool(where) != needs and kind != "generator"
    ):
        raise DfqError("--samples", source, SAMPLE_SOURCES, "e.g. --samples direct")
    if kind == "generator":
        from dfq_search.qat.config import GENERATOR_PRESETS

        if where and where not in GENERATOR_PRESETS:
            raise DfqError("--samples generator:PRESET", where, f"one of {', '.join(GENERATOR_PRESETS)}",
                           "e.g. --samples generator:gdfq")  # fmt: skip
    if sets["direct"] and kind != "direct":
        raise DfqError("--set direct.* without --samples direct", sorted(sets["direct"]),
                       "direct synthesis settings with direct samples", "drop them")  # fmt: skip
    samples = Samples(
        source={"real": "gaussian", "generator": "bank"}.get(kind, kind),  # real: real_images; generator:
        bank=where if kind == "bank" else None,  # a bank that generator_bank fills
        calibration=args.calib_images,
        heldout=args.heldout or 256,
        direct=DirectConfig.from_dict(sets["direct"], "--set direct"),
        seed=args.seed,
    )
    return Method(args.method, ptq, fine, samples, args.seed, distill=sets["distill"])


def real_images(args: argparse.Namespace, preprocess: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``--samples real:DIR``: calibration and held-out images drawn (disjoint, seeded) from DIR."""
    if not (args.samples or "").startswith("real:"):
        return None
    from dfq_search.data.folder import load_image_folder

    data = load_image_folder(Path(args.samples.removeprefix("real:")), preprocess)
    n, held = args.calib_images, args.heldout or 256
    if len(data) < n + held:
        raise DfqError("too few images in --samples real:DIR", len(data),
                       f"at least --calib-images + --heldout = {n + held}",
                       "lower them or add images")  # fmt: skip
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    x = preprocess.normalize(data.images[pick[: n + held]])
    return x[:n], x[n:]


def generator_bank(args: argparse.Namespace, bundle: Any, device: Any) -> str | None:
    """``--samples generator[:PRESET]``: a generator of the preset (default gdfq) trained against P in
    this process, its samples kept in a sample bank in the cache (made once per model, preset and seed;
    a rerun reads it); the bank's path, or None for another source."""
    kind, _, preset = (args.samples or "").partition(":")
    if kind != "generator":
        return None
    from dfq_search.bank import SampleBank
    from dfq_search.bank.bank import BankHeader
    from dfq_search.bank.generate import WorkerConfig, generate_into_bank
    from dfq_search.cache import cache_dir
    from dfq_search.fingerprint import model_fingerprint

    preset = preset or "gdfq"  # checked by method_of
    want = args.calib_images + (args.heldout or 256)
    base = WorkerConfig(preset=preset, seed=args.seed, keep_after=GENERATOR_WARMUP)
    per_step = base.game_config().train.batch_size
    steps = GENERATOR_WARMUP + -(-want // per_step)
    config = WorkerConfig(name=f"{preset}-s{args.seed}", preset=preset, seed=args.seed,
                          keep_after=GENERATOR_WARMUP, steps=steps)  # fmt: skip
    fingerprint = model_fingerprint(bundle.model)
    path = cache_dir() / "generator_banks" / f"{fingerprint[:16]}-{config.name}"
    header = BankHeader(fingerprint, bundle.preprocess.shape, bundle.num_classes, bundle.name)
    bank = SampleBank.create(str(path), header)
    print(f"generator samples ({preset}): {want} into {path} ...", flush=True)
    show = lambda i: print(f"  step {i['step']}, {i['samples']} samples", flush=True)  # noqa: E731
    generate_into_bank(bundle.model, bank, config, want, device, show)
    return str(path)
