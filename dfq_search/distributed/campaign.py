"""A campaign's shared samples on Ray (``samples.source: generator``): generator workers train against P
and fill a named, sharded sample buffer, which writes every chunk and published generator through to
the campaign's Parquet bank; trials draw their calibration samples from the buffer by name
(:class:`BufferDraw`). A campaign resumed reloads from the bank (its workers resume from the
generators published there, with no generation when the bank holds enough); a buffer shard rebuilt
after a crash or a lost node reloads its share of the bank; a generator worker restarted resumes
from its last published state.

The held-out samples of the label-free objective are drawn fresh from the workers' final published
generators (never put in the buffer, so no trial calibrates on them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dfq_search.bank import BankHeader, SampleBank, SourceTrainer, WorkerConfig
from dfq_search.distributed.buffer import SampleBuffer
from dfq_search.distributed.session import NAMESPACE
from dfq_search.distributed.worker import WorkerPool
from dfq_search.fingerprint import model_fingerprint
from dfq_search.models import ModelBundle
from dfq_search.search.runner import print_line
from dfq_search.search.space import Resources, Samples

HELDOUT_SEED = 7919
PUBLISH_EVERY = 50  # steps between a generator worker's published states (at most)
Log = Callable[[str], None]
_LIVE: dict[str, SampleBuffer] = {}  # the driver holds its buffers: Ray collects actors nobody holds


@dataclass(frozen=True)
class BufferDraw:
    """What a trial holds to draw from the campaign's buffer (a name, not data), and to warm-start its
    own generator from the shared one: ``generators`` maps a source name (gdfq, lrq) to the worker
    that trained that architecture."""

    name: str
    namespace: str = NAMESPACE
    generators: tuple[tuple[str, str], ...] = ()

    def __call__(self, n: int) -> Tensor:
        return SampleBuffer.connect(self.name, self.namespace).sample(n).x.float()

    def generator_state(self, source: str) -> dict | None:
        """The latest published state of a worker generator of architecture ``source``, or None."""
        worker = dict(self.generators).get(source)
        if worker is None:
            return None
        got = SampleBuffer.connect(self.name, self.namespace).latest_generator(worker)
        return None if got is None else got[0]


def _configs(cfg: Samples) -> list[WorkerConfig]:
    # a worker publishes its state at least four times: one restarted (its node lost) replays at most a
    # quarter of its steps, and one of a short generation does not start again from scratch
    every = max(1, min(PUBLISH_EVERY, cfg.generator_steps // 4))
    return [WorkerConfig(name=f"{preset}-{i}", preset=preset, seed=cfg.seed + i, steps=cfg.generator_steps,
                         keep_after=cfg.keep_after, chunk=256, publish_every=every)
            for i, preset in enumerate(cfg.generators)]  # fmt: skip


def _heldout(bundle: ModelBundle, buffer: SampleBuffer, configs: list[WorkerConfig], n: int) -> Tensor:
    """``n`` fresh samples of the final generators, split over them, seeded apart from training."""
    parts, gen = [], torch.Generator().manual_seed(HELDOUT_SEED)
    per = [n // len(configs) + (i < n % len(configs)) for i in range(len(configs))]
    for config, k in zip(configs, per, strict=True):
        got = buffer.latest_generator(config.name)
        trainer = SourceTrainer(bundle.model, config, bundle.preprocess.shape, bundle.num_classes)
        if got is not None:
            trainer.load_state_dict(got[0])
        with torch.no_grad():
            parts.append(trainer.source.sample(k, gen)[0])
    return torch.cat(parts)


def generator_samples(
    bundle: ModelBundle, cfg: Samples, bank_uri: str, name: str, resources: Resources,
    log: Callable[[str], None] = print_line,
) -> tuple[BufferDraw, Tensor, float, str]:  # fmt: skip
    """Fill (or reload) the campaign buffer; returns (draw, held-out samples, seconds, origin)."""
    start, configs = time.perf_counter(), _configs(cfg)
    fingerprint = model_fingerprint(bundle.model)
    header = BankHeader(fingerprint, bundle.preprocess.shape, bundle.num_classes, bundle.name, "float16")
    SampleBank.create(bank_uri, header)
    steps = max(cfg.generator_steps - cfg.keep_after, 0)
    kept = sum(steps * c.game_config().train.batch_size for c in configs)
    # A restarted worker replays the steps since its last published state (at most publish_every): room
    # for them, or the buffer fills up and the worker waits for room that no one makes. Each worker deals
    # its chunks round robin over the shards: a shard may get a chunk more than its share from each
    # worker, and one more from each restart (no shard may evict what the campaign keeps).
    replay = sum(c.publish_every * c.game_config().train.batch_size for c in configs)
    slack = cfg.buffer_shards * 2 * sum(c.chunk for c in configs) if cfg.buffer_shards > 1 else 0
    shape, classes = bundle.preprocess.shape, bundle.num_classes
    capacity = max(kept + replay + slack, cfg.calibration)
    buffer = _LIVE[name] = SampleBuffer.start(name, capacity, shape, classes,
                                              shards=cfg.buffer_shards, namespace=NAMESPACE,
                                              bank=(bank_uri, fingerprint))  # fmt: skip
    loaded = buffer.load_bank(bank_uri, fingerprint)  # with the generators published there
    if loaded >= kept:
        origin = f"bank {bank_uri} ({loaded} samples, no generation)"
    else:
        _generate(bundle, configs, buffer, resources, log)
        held = buffer.stats()["filled"]
        origin = f"{len(configs)} generator workers, {held} samples written through to {bank_uri}"
    heldout = _heldout(bundle, buffer, configs, cfg.heldout)
    sources: dict[str, str] = {}
    for c in configs:
        sources.setdefault(c.game_config().source.name, c.name)
    return BufferDraw(name, NAMESPACE, tuple(sources.items())), heldout, time.perf_counter() - start, origin


def _generate(
    bundle: ModelBundle, configs: list[WorkerConfig], buffer: SampleBuffer, resources: Resources, log: Log
) -> None:
    """Run the generator workers to their last step (the buffer writes their samples through to the
    bank), then one line per worker: its node, and from which step it resumed when it was restarted."""
    steps = configs[0].steps
    log(f"generator workers: {', '.join(c.name for c in configs)}, {steps} steps each")
    pool = WorkerPool(configs, bundle.model, bundle.preprocess.shape, bundle.num_classes, buffer,
                      gpus_per_worker=resources.worker_gpu, cpus_per_worker=resources.worker_cpu)  # fmt: skip
    pool.run()
    while not pool.done(timeout=10.0):
        st = buffer.stats()
        log(f"  buffer {st['filled']}/{st['capacity']} samples, {st['add_rate']:.0f} samples/s")
    for name, st in pool.wait().items():
        again = f", restarted, resumed from step {st['resumed_from']}" if st["reconstructed"] else ""
        log(f"  generator {name}: {st['step']} steps on node {st['node']}{again}")
    pool.shutdown()
