"""Generator workers: Ray actors that train a sample source against P and stream into a buffer.

Each worker runs a :class:`dfq_search.bank.SourceTrainer` (its own config and seed; a campaign may mix
GDFQ, DSG and LRQ workers), sends chunks of samples to the buffer, and every ``publish_every`` steps
publishes its generator state (weights, Adam, RNG, step) to the buffer. The actor is restartable:
Ray restarts a killed worker (``max_restarts``) and retries its ``run`` call (``max_task_retries``);
the new instance resumes from the last published state and sends no sample of the steps it replays
that the buffer already received. It pauses when told to, and while the
buffer is full (``pause_when_full``). It asks for a fraction of a GPU when the cluster has GPUs.
"""

from __future__ import annotations

import copy
import threading
import time

import ray
import torch

from dfq_search.bank import SourceTrainer, WorkerConfig, check_forks, concat, share_warmups, warmup_name
from dfq_search.distributed.buffer import SampleBuffer
from dfq_search.distributed.session import actor_device, gpu_fraction, node_id
from dfq_search.errors import DfqError


@ray.remote(max_concurrency=2)  # run() in one thread; pause/stop/status answered in the other
class GeneratorWorker:
    """One generator worker (see the module docstring)."""

    def __init__(self, config: WorkerConfig, p, input_shape, num_classes: int, buffer: str, namespace: str):
        torch.set_num_threads(1)
        self.config, self.buffer = config, SampleBuffer.connect(buffer, namespace)
        device = actor_device()
        self.trainer = SourceTrainer(p.to(device), config, tuple(input_shape), num_classes, device)
        self.hash = config.generator_hash()
        self.resumed_from = 0
        got = self.buffer.latest_generator(config.name)
        if got is not None and got[1].get("config_hash") == self.hash:
            self.trainer.load_state_dict(got[0])
            self.resumed_from = self.trainer.step_count
        self.reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        # a restarted worker replays the steps since its last published state (all of them when it
        # had published none: it is seeded): the buffer has them
        again = self.resumed_from or self.reconstructed
        self.held_up_to = self.buffer.last_step(config.name) if again else -1
        self.paused, self.stopped = threading.Event(), threading.Event()
        self.waiting_full = self.forking = False
        self.forked_at: int | None = None

    def run(self) -> dict:
        """Train until ``config.steps`` (or ``stop``); returns :meth:`status` at the end."""
        cfg, pending, in_flight = self.config, [], None
        if cfg.fork_from and self.trainer.step_count == 0:
            self._fork()
        while self.trainer.step_count < cfg.steps and not self.stopped.is_set():
            if self.paused.is_set() or self._full():
                time.sleep(0.05)
                continue
            samples, _ = self.trainer.step()
            if self.trainer.step_count > cfg.keep_after and int(samples.step.max()) > self.held_up_to:
                pending.append(samples)
            if sum(map(len, pending)) >= cfg.chunk:
                in_flight = self._send(pending, in_flight)
            if self.trainer.step_count % cfg.publish_every == 0:
                # the published state never runs ahead of the samples the buffer holds: a worker
                # restarted from it resumes after them (a step still pending at a kill was lost)
                in_flight = self._drain(pending, in_flight)  # None: nothing in flight
                self._publish()
            if self.trainer.step_count == cfg.keep_after:
                self._publish(warmup_name(cfg.name))
        self._drain(pending, in_flight)
        ray.get(self._publish())
        return self.status()

    def _drain(self, pending: list, in_flight) -> None:
        """Send what is pending and wait until the buffer holds it (nothing is in flight after it)."""
        in_flight = self._send(pending, in_flight)
        if in_flight is not None:
            self.waiting_full = self.config.pause_when_full and not ray.get(in_flight)["wants_more"]

    def _send(self, pending: list, in_flight):
        """Send the pending chunk; waits for the previous one first (back-pressure, one in flight)."""
        if in_flight is not None:
            self.waiting_full = self.config.pause_when_full and not ray.get(in_flight)["wants_more"]
        if not pending:
            return None
        ref = self.buffer.add(concat(pending), self.hash)
        pending.clear()
        return ref

    def _full(self) -> bool:
        if self.waiting_full:
            time.sleep(0.2)
            self.waiting_full = not self.buffer.wants_more()
        return self.waiting_full

    def _publish(self, name: str | None = None):
        meta = {"config_hash": self.hash, "config": {"worker": vars(self.config)}}
        name = name or self.config.name
        return self.buffer.publish(name, self.trainer.step_count, self.trainer.state_dict(), meta)

    def _fork(self) -> None:
        """Wait for the warm-up of worker ``fork_from`` to be published, then continue from it. When
        that worker is not running (no room for it on the cluster yet, or gone) or resumed past its
        warm-up (a resumed run, whose warm-up was never published here), train the warm-up here."""
        self.forking, leader, warm = True, self.config.fork_from, warmup_name(self.config.fork_from)
        actor = self._actor(leader)
        while not self.stopped.is_set() and self._answers(actor):
            meta = self.buffer.published()  # the leader's first: @warmup precedes its later versions
            if warm in meta and meta[warm].get("config_hash") == self.hash:
                self.trainer.fork(self.buffer.latest_generator(warm)[0])
                self.forked_at = self.trainer.step_count
                break
            if meta.get(leader, {}).get("step", 0) > self.config.keep_after:
                break
            time.sleep(0.1)
        self.forking = False

    def _actor(self, worker: str):
        """The handle of worker ``worker`` of this buffer, or None when there is none."""
        try:
            return ray.get_actor(f"{self.buffer.name}/worker/{worker}", namespace=self.buffer.namespace)
        except ValueError:
            return None

    @staticmethod
    def _answers(actor, timeout: float = 10.0) -> bool:
        """Whether ``actor`` (a worker) answers within ``timeout`` seconds."""
        try:
            return actor is not None and ray.get(actor.status.remote(), timeout=timeout) is not None
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return False

    def pause(self) -> None:
        self.paused.set()

    def resume(self) -> None:
        self.paused.clear()

    def stop(self) -> None:
        self.stopped.set()

    def status(self) -> dict:
        return {"name": self.config.name, "step": self.trainer.step_count, "steps": self.config.steps,
                "generator_seconds": self.trainer.seconds,
                "generator_cpu_seconds": self.trainer.cpu_seconds, "resumed_from": self.resumed_from,
                "forked_at": self.forked_at, "waiting_for_warmup": self.forking,
                "reconstructed": self.reconstructed, "paused": self.paused.is_set(),
                "waiting_full": self.waiting_full, "device": str(self.trainer.device),
                "node": node_id()}  # fmt: skip


class WorkerPool:
    """Generator workers of one buffer: start them, run them, pause, stop, watch them.

    With ``share_warmup`` (the default) workers of the same generator config train its warm-up once
    (:func:`share_warmups`): N workers then cost one warm-up plus their kept steps, not N warm-ups.
    """

    def __init__(
        self, configs: list[WorkerConfig], p: torch.nn.Module, input_shape, num_classes: int,
        buffer: SampleBuffer, gpus_per_worker: float = 0.25, cpus_per_worker: float = 1,
        max_restarts: int = 3, share_warmup: bool = True,
    ) -> None:  # fmt: skip
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise DfqError("duplicate worker names", names, "one name per worker", "give each a name")
        configs = share_warmups(configs) if share_warmup else configs
        check_forks(configs)
        self.configs = {c.name: c for c in configs}
        # P travels once, through the object store. The pool keeps the ref alive: a restarted worker
        # reads its constructor arguments again, and they vanish with the last reference (ray#53727).
        self.p_ref = p_ref = ray.put(copy.deepcopy(p).cpu().eval())
        opts = {"num_cpus": cpus_per_worker, "num_gpus": gpu_fraction(gpus_per_worker),
                "namespace": buffer.namespace, "max_restarts": max_restarts,
                "max_task_retries": -1}  # fmt: skip  # a call waits for the restart, however long
        self.workers = {
            c.name: GeneratorWorker.options(name=f"{buffer.name}/worker/{c.name}", **opts)
            .remote(c, p_ref, tuple(input_shape), num_classes, buffer.name, buffer.namespace)
            for c in configs
        }  # fmt: skip
        self.runs: dict = {}

    def run(self) -> None:
        """Start every worker's ``run`` (non-blocking); :meth:`wait` collects the results."""
        self.runs = {name: w.run.remote() for name, w in self.workers.items()}

    def done(self, timeout: float = 0.0) -> bool:
        """True when every run has returned, waiting up to ``timeout`` seconds for that."""
        runs = list(self.runs.values())
        finished, _ = ray.wait(runs, num_returns=len(runs), timeout=timeout)
        return len(finished) == len(runs)

    def wait(self, timeout: float | None = None) -> dict[str, dict]:
        return dict(zip(self.runs, ray.get(list(self.runs.values()), timeout=timeout), strict=True))

    def status(self) -> dict[str, dict]:
        return dict(
            zip(self.workers, ray.get([w.status.remote() for w in self.workers.values()]), strict=True)
        )

    def pause(self) -> None:
        ray.get([w.pause.remote() for w in self.workers.values()])

    def resume(self) -> None:
        ray.get([w.resume.remote() for w in self.workers.values()])

    def stop(self) -> None:
        ray.get([w.stop.remote() for w in self.workers.values()])

    def kill(self, name: str, restart: bool = True) -> None:
        """Kill one worker (Ray restarts it when ``restart``); for tests and fault drills."""
        ray.kill(self.workers[name], no_restart=not restart)

    def shutdown(self) -> None:
        for w in self.workers.values():
            ray.kill(w, no_restart=True)
