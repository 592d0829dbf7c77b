"""``dfq-search generate`` (build or extend a sample bank) and ``dfq-search bank info`` (describe one).

``generate`` trains one generator per ``--seeds`` entry against the model alone and writes its samples
into the bank until each generator has contributed ``--samples`` (resumable: a rerun continues each
generator from its last published state). ``--workers 0`` runs in this process without Ray; with
``--workers N`` N generator workers at a time run as Ray actors (local Ray, or ``--address``) and
stream into a sample buffer that is spilled into the bank at the end.
"""

from __future__ import annotations

import argparse
import time

from dfq_search.bank import BankHeader, SampleBank, WorkerConfig, generate_into_bank, share_warmups
from dfq_search.device import resolve_device
from dfq_search.errors import DfqError
from dfq_search.fingerprint import model_fingerprint
from dfq_search.models import create_model
from dfq_search.models.preprocessing import given
from dfq_search.report import format_table


def _configs(args: argparse.Namespace) -> list[WorkerConfig]:
    batch = args.batch_size_gen
    overrides = list(args.set) + ([f"train.batch_size={batch}"] if batch else [])
    base = WorkerConfig(preset=args.preset, overrides=overrides, keep_after=args.keep_after)
    per_step = base.game_config().train.batch_size
    steps = args.steps or args.keep_after + -(-args.samples // per_step)
    return [WorkerConfig(name=f"{args.preset}-s{seed}", preset=args.preset, overrides=overrides, seed=seed,
                         steps=steps, keep_after=args.keep_after, chunk=args.shard_rows)
            for seed in args.seeds]  # fmt: skip


def _progress(start: float):
    def show(info: dict) -> None:
        t = time.perf_counter() - start
        print(f"  [{t:7.1f} s] {info['generator']}: step {info['step']}, {info['samples']} samples, "
              f"loss {info.get('loss', float('nan')):.4f}", flush=True)  # fmt: skip

    return show


def _check_args(args: argparse.Namespace) -> None:
    """The numbers and the address, before the model is built or the bank touched."""
    lows = {"samples": 1, "steps": 1, "batch_size_gen": 1, "shard_rows": 1, "keep_after": 0, "workers": 0,
            "num_classes": 1}  # fmt: skip
    for flag, low in lows.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            raise DfqError(f"--{flag.replace('_', '-')}", value, f"an integer >= {low}", "pass a larger one")
    if not args.progress_every > 0:
        raise DfqError("--progress-every", args.progress_every, "seconds > 0", "pass e.g. 10")
    if args.address is not None and args.workers > 0:
        from dfq_search.distributed.session import check_address

        check_address(args.address)


def cmd_generate(args: argparse.Namespace) -> int:
    _check_args(args)
    configs = _configs(args)  # refuses a bad preset or --set before anything is written
    device = resolve_device(args.device)
    bundle = create_model(args.model, args.weights, args.num_classes, device, **given(vars(args)))
    header = BankHeader(model_fingerprint(bundle.model), bundle.preprocess.shape, bundle.num_classes,
                        bundle.name, args.encoding)  # fmt: skip
    bank = SampleBank.create(args.bank, header)
    start = time.perf_counter()
    print(f"{bundle.name} (fingerprint {header.fingerprint}) -> {args.bank}: "
          f"{len(configs)} generator(s) x {args.samples} samples", flush=True)  # fmt: skip
    if args.workers == 0:  # one after the other; generators of one config share the first one's warm-up
        results = [generate_into_bank(bundle.model, bank, c, args.samples, device, _progress(start))
                   for c in share_warmups(configs)]  # fmt: skip
    else:
        results = _generate_on_ray(args, bundle, bank, configs, start)
    print(format_table(results))
    info = bank.info()
    print(f"bank: {info['samples']} samples in {info['shards']} shards, {info['bytes'] / 2**20:.1f} MiB; "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


def _generate_on_ray(args, bundle, bank: SampleBank, configs: list[WorkerConfig], start: float) -> list[dict]:
    from dfq_search import distributed as dist

    dist.init(args.address, num_cpus=None if args.address else args.workers)
    have = bank.info()["samples_per_generator"]
    todo = [c for c in configs if have.get(c.name, 0) < args.samples]
    results = [{"generator": c.name, "step": None, "samples": have.get(c.name, 0), "seconds": 0.0}
               for c in configs if c not in todo]  # fmt: skip
    buf = dist.SampleBuffer.start(f"generate-{bank.header.fingerprint}", max(1, args.samples * len(todo)),
                                  bank.header.image_shape, bank.header.num_classes)  # fmt: skip
    for i in range(0, len(todo), args.workers):
        group = todo[i : i + args.workers]
        for c in group:  # resume each generator from its last state in the bank
            versions = bank.generator_versions(c.name)
            if versions and versions[-1].config_hash == c.generator_hash():
                buf.publish(c.name, versions[-1].step, bank.load_generator(versions[-1]),
                            {"config_hash": c.generator_hash()})  # fmt: skip
        pool = dist.WorkerPool(group, bundle.model, bank.header.image_shape, bank.header.num_classes, buf)
        pool.run()
        while not pool.done(timeout=args.progress_every):
            for st in pool.status().values():
                t = time.perf_counter() - start
                print(f"  [{t:7.1f} s] {st['name']}: step {st['step']}/{st['steps']}", flush=True)
        for name, st in pool.wait().items():
            state, meta = buf.latest_generator(name)
            bank.publish_generator(name, st["step"], state, {}, meta["config_hash"])
            results.append({"generator": name, "step": st["step"], "seconds": st["generator_seconds"]})
        buf.spill(args.bank, bank.header)
        pool.shutdown()
    buf.kill()  # a later run starts a buffer sized for its own work
    counts = bank.info()["samples_per_generator"]
    return [{**r, "samples": counts.get(r["generator"], 0)} for r in results]


def cmd_bank(args: argparse.Namespace) -> int:
    """``bank info PATH``: the header, counts per generator, published generator versions."""
    bank = SampleBank.open(args.path)
    info = bank.info()
    rows = [{"key": k, "value": v} for k, v in info.items() if not isinstance(v, dict)]
    print(format_table(rows))
    gens = [{"generator": g, "samples": n, "latest_step": info["latest_generator_steps"].get(g)}
            for g, n in info["samples_per_generator"].items()]  # fmt: skip
    if gens:
        print(format_table(gens))
    if args.verify:
        bad = 0
        for entry in bank.entries():
            try:
                bank.read(entry)
            except Exception as err:
                bad += 1
                print(f"damaged: {entry.file}: {err}")
        print(f"verified {len(bank.entries())} shards: {bad} damaged")
        return 1 if bad else 0
    return 0
