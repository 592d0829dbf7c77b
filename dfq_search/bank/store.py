"""A bounded in-memory store of labelled samples: the state behind one sample-buffer actor (plain torch).

Capacity is fixed and preallocated (pixels in float16, see :mod:`dfq_search.bank.codec`). Eviction is
first-in first-out: once full, each new sample overwrites the oldest held one (a ring), so the store
always holds the ``capacity`` most recent samples. ``sample(n)`` draws uniformly over what is held
(without replacement when ``n`` <= held), each sample tagged with its generator and that generator's
step. Rows not yet written to a bank are tracked so a spill writes each sample at most once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from dfq_search.bank.shard import Samples
from dfq_search.errors import DfqError


@dataclass
class Batch:
    """Samples served by a buffer: ``generator[i]`` names the source of row i, ``step[i]`` its step."""

    x: Tensor
    y: Tensor
    step: Tensor
    generator: list[str]
    logits: Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)


class SampleStore:
    """``capacity`` samples of ``image_shape`` with labels, steps, generator ids and optional logits."""

    def __init__(self, capacity: int, image_shape: tuple[int, int, int], num_classes: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise DfqError("buffer capacity", capacity, "an int >= 1 (samples)", "pass e.g. 50_000")
        self.capacity, self.image_shape, self.num_classes = capacity, tuple(image_shape), num_classes
        self.x = torch.empty(capacity, *image_shape, dtype=torch.float16)
        self.y = torch.zeros(capacity, dtype=torch.int64)
        self.step = torch.zeros(capacity, dtype=torch.int64)
        self.source = torch.zeros(capacity, dtype=torch.int64)
        self.logits: Tensor | None = None
        self.unspilled = torch.zeros(capacity, dtype=torch.bool)
        self.names: list[str] = []
        self.config_hashes: dict[str, str] = {}
        self.last_step: dict[str, int] = {}  # the newest step added per generator (evicted or not)
        self.next, self.filled = 0, 0
        self.added, self.evicted, self.served, self.batches_served = 0, 0, 0, 0
        self.started = time.monotonic()

    def _source_id(self, name: str, config_hash: str) -> int:
        if name not in self.names:
            self.names.append(name)
        self.config_hashes.setdefault(name, config_hash)
        return self.names.index(name)

    def add(self, samples: Samples, config_hash: str = "", spilled: bool = False) -> int:
        """Store ``samples`` (oldest evicted first when full); returns how many were evicted."""
        n = dropped = len(samples)
        if tuple(samples.x.shape[1:]) != self.image_shape:
            raise DfqError("sample shape", tuple(samples.x.shape[1:]), f"{self.image_shape}",
                           "add samples of the buffer's model")  # fmt: skip
        if n > self.capacity:  # only the newest capacity rows can survive
            keep = slice(n - self.capacity, n)
            logits = None if samples.logits is None else samples.logits[keep]
            samples = Samples(samples.x[keep], samples.y[keep], samples.step[keep], logits, samples.generator)
            n = self.capacity
        dropped -= n
        idx = (self.next + torch.arange(n)) % self.capacity
        evicted = max(0, self.filled + n - self.capacity) + dropped
        self.x[idx] = samples.x.detach().to("cpu", torch.float16)
        self.y[idx], self.step[idx] = samples.y.cpu(), samples.step.cpu()
        self.source[idx] = self._source_id(samples.generator, config_hash)
        if n:
            newest = int(samples.step.max())
            self.last_step[samples.generator] = max(self.last_step.get(samples.generator, newest), newest)
        if samples.logits is not None:
            if self.logits is None:
                self.logits = torch.zeros(self.capacity, samples.logits.shape[1])
            self.logits[idx] = samples.logits.detach().to("cpu", torch.float32)
        self.unspilled[idx] = not spilled
        self.next = (self.next + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)
        self.added += n + dropped
        self.evicted += evicted
        return evicted

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        """``n`` held samples drawn uniformly (without replacement when possible)."""
        if self.filled == 0:
            raise DfqError("the sample buffer is empty", 0, "at least one sample held",
                           "start generator workers or load a bank first")  # fmt: skip
        if n <= self.filled:
            idx = torch.randperm(self.filled, generator=gen)[:n]
        else:
            idx = torch.randint(self.filled, (n,), generator=gen)
        self.served += n
        self.batches_served += 1
        return self.rows(idx)

    def rows(self, idx: Tensor) -> Batch:
        logits = None if self.logits is None else self.logits[idx]
        names = [self.names[i] for i in self.source[idx].tolist()]
        return Batch(self.x[idx], self.y[idx], self.step[idx], names, logits)

    def take_unspilled(self) -> list[tuple[str, str, Samples]]:
        """The held rows not yet in a bank, one :class:`Samples` per generator; marks them spilled."""
        out = []
        for sid, name in enumerate(self.names):
            idx = torch.nonzero(self.unspilled[: self.filled] & (self.source[: self.filled] == sid)).flatten()
            if len(idx):
                b = self.rows(idx)
                out.append(
                    (name, self.config_hashes.get(name, ""), Samples(b.x, b.y, b.step, b.logits, name))
                )
                self.unspilled[idx] = False
        return out

    def stats(self) -> dict:
        """Counts (filled, capacity, added, evicted, served) and rates in samples per second."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        per_gen = {name: int((self.source[: self.filled] == i).sum()) for i, name in enumerate(self.names)}
        return {"filled": self.filled, "capacity": self.capacity, "added": self.added,
                "evicted": self.evicted, "served": self.served, "batches_served": self.batches_served,
                "unspilled": int(self.unspilled[: self.filled].sum()), "held_per_generator": per_gen,
                "last_step": dict(self.last_step),
                "serve_rate": self.served / elapsed, "add_rate": self.added / elapsed,
                "seconds": elapsed}  # fmt: skip
