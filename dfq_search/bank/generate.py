"""Train a sample source against P alone (the game's warm-up, no Q) and keep what it produces.

``SourceTrainer`` runs exactly the generator half of :class:`dfq_search.qat.Game` (same source, same
sample losses over one forward of P, same Adam, same seeding), so a generator trained here can
warm-start a trial's game (:func:`warm_start`) and the samples it yields are those the game's Q would
see. Sample-loss terms that need Q (AdaDFQ's margins) cannot run without one and are refused.
``generate_into_bank`` is the single-process form behind ``dfq-search generate``: resumable, because
the generator's state is published into the bank and read back on the next run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dfq_search.bank.bank import SampleBank
from dfq_search.bank.shard import Samples
from dfq_search.errors import DfqError, refuse_unknown_keys
from dfq_search.fingerprint import config_hash
from dfq_search.qat import Game, GameConfig, load_config
from dfq_search.qat.game import game_source
from dfq_search.synth.losses import NEEDS_Q, TermKnobs, TermParams
from dfq_search.synth.objective import SampleObjective


@dataclass
class WorkerConfig:
    """One generator worker: the generator half of a game config, its budget and how it feeds a buffer.

    ``preset`` and ``overrides`` (dotted ``key=value``) resolve a :class:`GameConfig` as in
    ``dfq_search.qat.load_config``; its ``source``, ``sample_loss`` and ``train.batch_size`` are used,
    with ``seed`` replacing ``train.seed``. Samples of steps < ``keep_after`` are not kept (the early
    generator is poor; the game's Q never sees its warm-up samples either).
    """

    name: str = "gdfq-0"
    preset: str | None = "gdfq"
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    steps: int = 1000
    keep_after: int = 0
    chunk: int = 256  # samples sent to the buffer (or written as one bank shard) at a time
    publish_every: int = 100
    pause_when_full: bool = True
    # Start from the generator of worker ``fork_from`` (same source and sample losses) as published at
    # the end of its warm-up (step ``keep_after``) instead of repeating the warm-up; this worker's own
    # ``seed`` then drives its sampling. Set by ``WorkerPool(share_warmup=True)``.
    fork_from: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> WorkerConfig:
        """A config from a mapping; unknown keys refused with the closest valid one."""
        refuse_unknown_keys("worker config", data, [f.name for f in dataclasses.fields(cls)])
        return cls(**data)

    def game_config(self) -> GameConfig:
        return load_config(self.preset, [*self.overrides, f"train.seed={self.seed}"])

    def generator_hash(self) -> str:
        """Hash of what decides the samples' distribution: the source and sample-loss sections."""
        cfg = self.game_config()
        return config_hash({"source": cfg.source, "sample_loss": cfg.sample_loss})


def warmup_name(worker: str) -> str:
    """The name under which a worker publishes its generator at the end of its warm-up."""
    return f"{worker}@warmup"


def share_warmups(configs: list[WorkerConfig]) -> list[WorkerConfig]:
    """Workers of one generator config (source and sample losses) and one warm-up length run the
    warm-up once: the first of them trains it, the others fork from it (``fork_from``)."""
    leaders: dict[tuple[str, int], str] = {}
    out = []
    for c in configs:
        if c.keep_after <= 0 or c.fork_from or c.steps <= c.keep_after:
            out.append(c)
            continue
        leader = leaders.setdefault((c.generator_hash(), c.keep_after), c.name)
        out.append(c if leader == c.name else dataclasses.replace(c, fork_from=leader))
    return out


def check_forks(configs: list[WorkerConfig]) -> None:
    """Refuse a ``fork_from`` that names no warm-up-training worker of ``configs``, or one of another
    generator config or warm-up length (before any worker starts)."""
    by_name = {c.name: c for c in configs}
    for c in configs:
        if not c.fork_from:
            continue
        leader = by_name.get(c.fork_from)
        if leader is None or leader.fork_from or leader.steps < leader.keep_after or leader.keep_after <= 0:
            valid = sorted(n for n, w in by_name.items() if w.keep_after > 0)
            raise DfqError(f"worker {c.name!r}: fork_from names no worker of this pool that trains a warm-up",
                           c.fork_from, f"one of {valid}",
                           "name a worker with keep_after > 0 and steps >= keep_after")  # fmt: skip
        if (leader.generator_hash(), leader.keep_after) != (c.generator_hash(), c.keep_after):
            raise DfqError(f"worker {c.name!r} forks from a worker of another generator config or warm-up",
                           c.fork_from, "a worker with the same preset, overrides and keep_after",
                           "drop fork_from or align the configs")  # fmt: skip


class SourceTrainer:
    """The generator half of the game: ``step()`` is ``Game.g_step`` with no Q."""

    def __init__(
        self, p: nn.Module, config: WorkerConfig, input_shape: tuple[int, int, int], num_classes: int,
        device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        self.config, self.device, self.p = config, torch.device(device), p.eval()
        cfg = self.game = config.game_config()
        need_q = sorted(k for k, w in cfg.sample_loss.weights.items() if w > 0 and k in NEEDS_Q)
        if need_q:
            raise DfqError("sample-loss terms that need Q in a generator worker", need_q,
                           "terms computed from P alone", "set their weights to 0 here")  # fmt: skip
        sl = cfg.sample_loss
        params = TermParams(**{f.name: getattr(sl, f.name) for f in dataclasses.fields(TermKnobs)})
        self.objective = SampleObjective(self.p, sl.weights, params, input_shape, self.device)
        self.source = game_source(cfg, num_classes, input_shape).to(self.device)
        self.opt = torch.optim.Adam(self.source.parameters(), lr=cfg.source.lr, betas=tuple(cfg.source.betas))
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self.step_count, self.seconds, self.cpu_seconds = 0, 0.0, 0.0

    def step(self) -> tuple[Samples, dict[str, float]]:
        """One generator step; returns its (detached) samples with P's logits, and the losses."""
        t, c = time.perf_counter(), time.thread_time()
        self.source.train()
        x, y = self.source.sample(self.game.train.batch_size, self.gen, self.device)
        loss, terms, z_p = self.objective(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.source.parameters()))
        self.opt.step()
        steps = torch.full((len(y),), self.step_count, dtype=torch.int64)
        self.step_count += 1
        self.seconds += time.perf_counter() - t
        self.cpu_seconds += time.thread_time() - c  # this thread's CPU: compute, whatever the contention
        samples = Samples(x.detach().cpu(), y.cpu(), steps, z_p.detach().float().cpu(), self.config.name)
        return samples, {"loss": float(loss.detach()), **terms}

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "opt_g": self.opt.state_dict(),
                "rng": self.gen.get_state(), "step": self.step_count, "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.opt.load_state_dict(state["opt_g"])
        self.gen.set_state(state["rng"])
        self.step_count, self.seconds = int(state["step"]), float(state.get("seconds", 0.0))
        self.cpu_seconds = float(state.get("cpu_seconds", 0.0))

    def fork(self, state: dict) -> None:
        """Continue another trainer's generator (its weights, Adam and step) with this trainer's own
        seed for sampling; the seconds it spent stay on its clock, not on this one's."""
        self.load_state_dict(state)
        self.gen.manual_seed(self.game.train.seed)
        self.seconds = self.cpu_seconds = 0.0


def warm_start(game: Game, state: dict, skip_warmup: bool = True) -> None:
    """Start ``game``'s generator (and its Adam state) from a published :class:`SourceTrainer` state.

    With ``skip_warmup`` the game's generator-only warm-up is counted as done, so its next step is a
    Q step (the shared warm-up replaced the trial's own).
    """
    game.source.load_state_dict(state["source"])
    game.opt_g.load_state_dict(state["opt_g"])
    if skip_warmup:
        game.step = max(game.step, game.cfg.train.warmup)


def generate_into_bank(
    p: nn.Module, bank: SampleBank, config: WorkerConfig, samples: int, device: torch.device | str = "cpu",
    progress: Callable[[dict], None] | None = None,
) -> dict:  # fmt: skip
    """Extend ``bank`` with this worker's samples until it holds ``samples`` of them (resumable).

    The generator's state at the end of its warm-up is published as ``warmup_name(config.name)``; a
    config with ``fork_from`` and no state of its own in the bank starts from that one's."""
    h = bank.header
    trainer = SourceTrainer(p, config, h.image_shape, h.num_classes, device)
    versions, warm = bank.generator_versions(config.name), _warmup_version(bank, config)
    if versions and versions[-1].config_hash == config.generator_hash():
        trainer.load_state_dict(bank.load_generator(versions[-1]))
    elif warm is not None:  # another generator of this config trained the warm-up: continue from it
        trainer.fork(bank.load_generator(warm))
    have = bank.info()["samples_per_generator"].get(config.name, 0)
    pending: list[Samples] = []
    while have < samples and trainer.step_count < config.steps:
        out, losses = trainer.step()
        if trainer.step_count > config.keep_after:
            pending.append(out)
        elif trainer.step_count == config.keep_after:  # for the generators that fork from this one
            bank.publish_generator(warmup_name(config.name), trainer.step_count, trainer.state_dict(),
                                   dataclasses.asdict(trainer.game), config.generator_hash())  # fmt: skip
        if sum(map(len, pending)) >= min(config.chunk, samples - have) or trainer.step_count >= config.steps:
            have += _flush(bank, pending, config, samples - have)
            _publish(bank, trainer, config)
            if progress:
                progress({"generator": config.name, "step": trainer.step_count, "samples": have, **losses})
    _publish(bank, trainer, config)
    return {"generator": config.name, "step": trainer.step_count, "samples": have, "seconds": trainer.seconds}


def _warmup_version(bank: SampleBank, config: WorkerConfig):
    """The published warm-up of ``config.fork_from`` when it is of this config, else None."""
    if not config.fork_from:
        return None
    found = bank.generator_versions(warmup_name(config.fork_from))
    ok = [v for v in found if v.config_hash == config.generator_hash() and v.step == config.keep_after]
    return ok[-1] if ok else None


def _flush(bank: SampleBank, pending: list[Samples], config: WorkerConfig, room: int) -> int:
    if not pending:
        return 0
    s = concat(pending)
    s = Samples(
        s.x[:room], s.y[:room], s.step[:room], None if s.logits is None else s.logits[:room], s.generator
    )
    pending.clear()
    bank.write_shard(s, config.generator_hash())
    return len(s)


def _publish(bank: SampleBank, trainer: SourceTrainer, config: WorkerConfig) -> None:
    versions = bank.generator_versions(config.name)
    if versions and versions[-1].step == trainer.step_count:
        return
    game_cfg = dataclasses.asdict(trainer.game)
    bank.publish_generator(
        config.name, trainer.step_count, trainer.state_dict(), game_cfg, config.generator_hash()
    )


def concat(parts: list[Samples]) -> Samples:
    """One :class:`Samples` of several of the same generator."""
    logits = None if any(p.logits is None for p in parts) else torch.cat([p.logits for p in parts])
    return Samples(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]),
                   torch.cat([p.step for p in parts]), logits, parts[0].generator)  # fmt: skip
