"""Everything that runs on Ray (the only package that imports it): the shared sample buffer, the
generator workers that fill it, and the session helpers. The algorithms they run are plain torch
(dfq_search.bank, dfq_search.synth, dfq_search.qat)."""

from dfq_search.distributed.buffer import BufferShard, SampleBuffer
from dfq_search.distributed.session import NAMESPACE, actor_device, gpu_fraction, init, shutdown
from dfq_search.distributed.worker import GeneratorWorker, WorkerPool

__all__ = [
    "NAMESPACE",
    "BufferShard",
    "GeneratorWorker",
    "SampleBuffer",
    "WorkerPool",
    "actor_device",
    "gpu_fraction",
    "init",
    "shutdown",
]
