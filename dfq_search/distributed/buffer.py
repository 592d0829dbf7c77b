"""The shared sample buffer: named Ray actors (one per shard) that own the samples they serve.

``SampleBuffer.start(name, capacity, ...)`` creates ``shards`` actors named ``<name>/<i>`` in the
namespace (default ``dfq_search``), shard i on the i-th live node (this one first), each a
:class:`dfq_search.bank.SampleStore` of ``capacity // shards`` samples (FIFO eviction). Trials reach
it with ``SampleBuffer.connect(name)``. A batch is put into the object store *by the shard actor*
(``ray.put`` inside it, so the actor owns it and no trial config carries data) and fetched by the
caller; ``sample(n)`` splits ``n`` over the shards in proportion to what each holds, so the draw is
uniform over everything held. Shard 0 also keeps the latest published state of each generator (its
``ray.put``, again owned by the buffer).

A buffer started with a bank writes through: every chunk added is committed to the bank (tagged with
the shard that wrote it) before the add returns, and every published generator state too. A shard
lost with its node is restarted by Ray on another node and reloads exactly the chunks it held (its
own, and its share of what the bank held before), shard 0 the latest generator states: no sample is
lost, and a retried add of a chunk already held is not added twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import ray
import torch

from dfq_search.bank import BankHeader, Batch, SampleBank, Samples, SampleStore
from dfq_search.bank.shard import ShardEntry
from dfq_search.distributed.session import NAMESPACE, node_id, on_node, spread_nodes
from dfq_search.errors import DfqError


@ray.remote(num_cpus=0)
class BufferShard:
    """One shard of the buffer (see the module docstring)."""

    def __init__(
        self, capacity: int, image_shape, num_classes: int, index: int, shards: int, seed: int,
        bank: tuple[str, str] | None = None, run: str = "",
    ) -> None:  # fmt: skip
        torch.set_num_threads(1)
        self.store = SampleStore(capacity, tuple(image_shape), num_classes)
        self.index, self.shards, self.writer = index, shards, f"{run}/{index}"
        self.gen = torch.Generator().manual_seed(seed * 1009 + index)
        self.refresh = False
        self.generators: dict[str, tuple[list, dict]] = {}
        self.chunks: set[tuple] = set()  # the chunks held, by chunk_key: a retried add is not added twice
        self.bank = None if bank is None else SampleBank.open(bank[0], bank[1])  # written through
        self.restored, self.rebuilt = 0, ray.get_runtime_context().was_current_actor_reconstructed
        if self.bank is not None and self.rebuilt:
            self.restored = self._load(self.bank, None)  # rebuilt after a crash: from the bank

    def num_shards(self) -> int:
        return self.shards

    def add(self, samples: Samples, config_hash: str = "") -> dict:
        """Hold ``samples`` (committed to the bank first, when there is one); a chunk already held is
        not added again (an add retried after this shard was rebuilt from the bank)."""
        key = chunk_key(samples.generator, samples.step, len(samples))
        if key not in self.chunks:
            if self.bank is not None:
                self.bank.write_shard(samples, config_hash, writer=self.writer)
            self.store.add(samples, config_hash, spilled=self.bank is not None)
            self.chunks.add(key)
        return {"filled": self.store.filled, "wants_more": self.wants_more()}

    def wants_more(self) -> bool:
        """True while not full, or always when refreshing (new samples then evict the oldest)."""
        return self.refresh or self.store.filled < self.store.capacity

    def set_refresh(self, flag: bool) -> None:
        self.refresh = bool(flag)

    def sample(self, n: int) -> tuple[list, int]:
        """([ref to a dict of numpy arrays], rows held): the ref is this actor's own ``ray.put``."""
        b = self.store.sample(n, self.gen)
        arrays = {"x": b.x.numpy(), "y": b.y.numpy(), "step": b.step.numpy(),
                  "generator": np.array(b.generator),
                  "logits": None if b.logits is None else b.logits.numpy()}  # fmt: skip
        return [ray.put(arrays)], self.store.filled

    def stats(self) -> dict:
        return {**self.store.stats(), "shard": self.index, "node": node_id(), "rebuilt": self.rebuilt,
                "restored": self.restored}  # fmt: skip

    def publish(self, name: str, step: int, state: dict, meta: dict) -> int:
        """Keep ``state`` as the latest version of generator ``name`` (an older step is ignored),
        published to the bank first when there is one."""
        old = self.generators.get(name)
        if old is None or old[1]["step"] <= step:
            if self.bank is not None:
                self.bank.publish_generator(
                    name, step, state, meta.get("config", {}), meta.get("config_hash", "")
                )
            self._keep(name, step, state, meta)
        return self.generators[name][1]["step"]

    def _keep(self, name: str, step: int, state: dict, meta: dict) -> None:
        self.generators[name] = ([ray.put(state)], {**meta, "name": name, "step": step})

    def latest_generator(self, name: str) -> tuple[list, dict] | None:
        return self.generators.get(name)

    def published(self) -> dict[str, dict]:
        return {k: meta for k, (_, meta) in self.generators.items()}

    def spill(self, uri: str, header: dict) -> int:
        """Write the held samples not yet in a bank to the bank at ``uri`` (one shard per generator)."""
        bank = SampleBank.create(uri, BankHeader(**header))
        parts = self.store.take_unspilled()
        for _, config_hash, samples in parts:
            bank.write_shard(samples, config_hash)
        return sum(len(s) for *_, s in parts)

    def load_bank(self, uri: str, fingerprint: str, max_samples: int | None) -> int:
        """Fill this shard from its share of a bank's shards (:func:`owned`), no generation; shard 0
        also takes the latest published state of every generator."""
        return self._load(SampleBank.open(uri, fingerprint), max_samples)

    def _load(self, bank: SampleBank, max_samples: int | None) -> int:
        loaded = 0
        for entry in owned(bank.entries(), self.writer, self.shards):
            key = chunk_key(entry.generator, (entry.first_step, entry.last_step), entry.rows)
            if key in self.chunks or (max_samples is not None and loaded >= max_samples):
                continue
            try:
                samples = bank.read(entry)
            except DfqError:
                continue  # a damaged shard is skipped, never served
            self.store.add(samples, entry.config_hash, spilled=True)
            self.chunks.add(key)
            loaded += len(samples)
        if self.index == 0:
            self._load_generators(bank)
        return loaded

    def _load_generators(self, bank: SampleBank) -> None:
        latest = {v.name: v for v in bank.generator_versions()}  # ordered by step: the last one stays
        for name, v in latest.items():
            if name not in self.generators or self.generators[name][1]["step"] < v.step:
                self._keep(name, v.step, bank.load_generator(v), {"config_hash": v.config_hash,
                                                                   "config": v.config})  # fmt: skip


def store_bytes(capacity: int, image_shape, num_classes: int) -> int:
    """What a :class:`~dfq_search.bank.SampleStore` of ``capacity`` holds in memory: float16 pixels, three
    int64 columns, a flag, and P's float32 logits."""
    return capacity * (2 * int(np.prod(image_shape)) + 3 * 8 + 1 + 4 * num_classes)


def chunk_key(generator: str, steps, rows: int) -> tuple[str, int, int, int]:
    """What tells one chunk of samples from another: its generator, first and last step, and size (a
    generator's steps are never sent twice, so no two different chunks share them)."""
    return generator, int(min(steps)), int(max(steps)), int(rows)


def owned(entries: list[ShardEntry], writer: str, shards: int) -> list[ShardEntry]:
    """The bank entries shard ``writer`` ("<run>/<index>") holds: those it wrote in this run, and every
    ``shards``-th of the others in commit order (none of which this run adds to)."""
    run, _, index = writer.rpartition("/")
    mine, others = [], 0
    for entry in entries:
        if run and entry.writer.rpartition("/")[0] == run:
            if entry.writer == writer:
                mine.append(entry)
            continue
        if others % shards == int(index):
            mine.append(entry)
        others += 1
    return mine


class SampleBuffer:
    """The client of a buffer's shards: what generator workers, trials and the driver hold."""

    def __init__(self, name: str, shards: list, namespace: str = NAMESPACE) -> None:
        self.name, self.shards, self.namespace = name, shards, namespace
        self.fills = [0] * len(shards)
        self.gen = np.random.default_rng()
        self._next = int(self.gen.integers(len(shards)))  # clients deal from different shards

    @classmethod
    def start(
        cls, name: str, capacity: int, image_shape, num_classes: int, shards: int = 1, seed: int = 0,
        namespace: str = NAMESPACE, bank: tuple[str, str] | None = None, max_restarts: int = 3,
    ) -> SampleBuffer:  # fmt: skip
        """Create (or join, when they exist) the named shard actors of a buffer of ``capacity``, shard i
        on the i-th live node (:func:`~dfq_search.distributed.session.spread_nodes`).

        With ``bank`` = (uri, P's fingerprint; the bank must exist), the buffer writes through to the
        bank, and a shard that dies (or whose node is lost) is restarted by Ray (up to
        ``max_restarts`` times, on another node when its own is gone; calls made meanwhile wait for
        it) and reloads what it held from the bank.
        """
        per = -(-capacity // shards)
        restarts = {"max_restarts": max_restarts, "max_task_retries": -1} if bank else {}
        run, nodes = uuid.uuid4().hex[:12], spread_nodes()
        # the memory it preallocates: Ray ignores the node of an actor that asks for no resource at all
        # (ray#25360 fixed that for hard node affinity only), so shards would land on random nodes
        memory = max(store_bytes(per, image_shape, num_classes), 2**20)
        actors = [
            BufferShard.options(name=f"{name}/{i}", namespace=namespace, get_if_exists=True, memory=memory,
                                scheduling_strategy=on_node(nodes[i % len(nodes)]), **restarts)
            .remote(per, tuple(image_shape), num_classes, i, shards, seed, bank, run)
            for i in range(shards)
        ]  # fmt: skip
        return cls(name, actors, namespace)

    @classmethod
    def connect(cls, name: str, namespace: str = NAMESPACE) -> SampleBuffer:
        """The buffer started under ``name`` in ``namespace`` (by this or another process)."""
        try:
            first = ray.get_actor(f"{name}/0", namespace=namespace)
        except ValueError as err:
            raise DfqError("no sample buffer of that name", name, f"a buffer in namespace {namespace!r}",
                           "start it (SampleBuffer.start) or fix the name") from err  # fmt: skip
        n = ray.get(first.num_shards.remote())
        return cls(name, [first] + [ray.get_actor(f"{name}/{i}", namespace=namespace) for i in range(1, n)],
                   namespace)  # fmt: skip

    def add(self, samples: Samples, config_hash: str = ""):
        """Send ``samples`` to the next shard (round robin); returns the call's ObjectRef."""
        shard = self.shards[self._next % len(self.shards)]
        self._next += 1
        return shard.add.remote(samples, config_hash)

    def wants_more(self) -> bool:
        return any(ray.get([s.wants_more.remote() for s in self.shards]))

    def set_refresh(self, flag: bool) -> None:
        ray.get([s.set_refresh.remote(flag) for s in self.shards])

    def sample(self, n: int) -> Batch:
        """``n`` samples drawn uniformly over all held ones; x as float16 [n, C, H, W]."""
        return _again_if_lost(lambda: self._sample(n))

    def _sample(self, n: int) -> Batch:
        if not any(self.fills):
            self.fills = [st["filled"] for st in ray.get([s.stats.remote() for s in self.shards])]
        weights = np.asarray(self.fills, dtype=float)
        counts = (
            self.gen.multinomial(n, weights / weights.sum())
            if weights.sum()
            else [n] + [0] * (len(weights) - 1)
        )
        which = [i for i, c in enumerate(counts) if c]
        answers = ray.get([self.shards[i].sample.remote(int(counts[i])) for i in which])  # all shards at once
        for i, (_, filled) in zip(which, answers, strict=True):
            self.fills[i] = filled
        return _batch(ray.get([refs[0] for refs, _ in answers]))

    def stats(self) -> dict:
        """Summed counts and rates over the shards, with the per-shard statistics."""
        per = ray.get([s.stats.remote() for s in self.shards])
        keys = ("filled", "capacity", "added", "evicted", "served", "batches_served", "unspilled",
                "serve_rate", "add_rate")  # fmt: skip
        return {**{k: sum(p[k] for p in per) for k in keys}, "shards": per}

    def last_step(self, generator: str) -> int:
        """The newest step (the samples' 0-based tag) of ``generator`` any shard received (-1: none)."""
        per = ray.get([s.stats.remote() for s in self.shards])
        return max((st["last_step"].get(generator, -1) for st in per), default=-1)

    def publish(self, name: str, step: int, state: dict, meta: dict | None = None):
        return self.shards[0].publish.remote(name, step, state, meta or {})

    def published(self) -> dict[str, dict]:
        """The metadata (step, config hash) of every generator's latest published version."""
        return ray.get(self.shards[0].published.remote())

    def latest_generator(self, name: str) -> tuple[dict, dict] | None:
        """(state, meta) of the latest published version of generator ``name``, or None."""

        def get() -> tuple[dict, dict] | None:
            got = ray.get(self.shards[0].latest_generator.remote(name))
            return None if got is None else (ray.get(got[0][0]), got[1])

        return _again_if_lost(get)

    def spill(self, uri: str, header: BankHeader) -> int:
        from dataclasses import asdict

        return sum(ray.get([s.spill.remote(uri, asdict(header)) for s in self.shards]))

    def load_bank(self, uri: str, fingerprint: str, max_samples: int | None = None) -> int:
        """Fill the buffer from a bank (refused when made for another model); returns samples loaded."""
        SampleBank.open(uri, fingerprint)  # refuse a mismatch here, with the user's message
        per = None if max_samples is None else -(-max_samples // len(self.shards))
        loaded = sum(ray.get([s.load_bank.remote(uri, fingerprint, per) for s in self.shards]))
        self.fills = [0] * len(self.shards)
        return loaded

    def kill(self, restart: bool = False) -> None:
        """Kill every shard (Ray restarts them from the bank when ``restart`` and they have one)."""
        for s in self.shards:
            ray.kill(s, no_restart=not restart)


T = TypeVar("T")
LOST_TRIES = 3


def _again_if_lost(fetch: Callable[[], T]) -> T:
    """``fetch()``, asked again when what a shard handed out was lost with its node between its
    answer and the fetch (the restarted shard hands it out again)."""
    for attempt in range(LOST_TRIES):
        try:
            return fetch()
        except ray.exceptions.ObjectLostError:  # OwnerDiedError among them
            if attempt == LOST_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def _batch(parts: list[dict]) -> Batch:
    logits = None if any(p["logits"] is None for p in parts) else torch.from_numpy(
        np.concatenate([p["logits"] for p in parts]))  # fmt: skip
    return Batch(torch.from_numpy(np.concatenate([p["x"] for p in parts])),
                 torch.from_numpy(np.concatenate([p["y"] for p in parts])),
                 torch.from_numpy(np.concatenate([p["step"] for p in parts])),
                 [str(g) for p in parts for g in p["generator"]], logits)  # fmt: skip
