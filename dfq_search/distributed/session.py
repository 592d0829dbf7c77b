"""Starting or joining Ray, and the resources an actor asks for (every Ray call of the project is in
this package; Ray's API moves between releases, so the calls stay few and in one place)."""

from __future__ import annotations

import logging
import os

import ray

NAMESPACE = "dfq_search"
# Tune's console output: the legacy engine (silent at verbose=0; the campaign prints its own lines),
# and no warning about frequent experiment snapshots (a campaign of short trials makes many).
QUIET = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def init(address: str | None = None, num_cpus: int | None = 2, namespace: str = NAMESPACE, **kwargs) -> None:
    """Join the cluster at ``address``, or start a local Ray bound to localhost (no dashboard).

    Idempotent: when Ray is already initialised in this process, nothing happens.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by the workers Ray starts
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address, namespace=namespace, **kwargs)
        return
    kwargs.setdefault("object_store_memory", 512 * 2**20)
    kwargs.setdefault("logging_level", logging.ERROR)
    ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=namespace, log_to_driver=False,
             _node_ip_address="127.0.0.1", **kwargs)  # fmt: skip


def shutdown() -> None:
    ray.shutdown()


def gpu_fraction(requested: float) -> float:
    """``requested`` GPUs per actor when the cluster has GPUs, else 0 (the actor runs on CPU)."""
    return requested if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def actor_device() -> str:
    """The device inside an actor: its assigned GPU when Ray gave it one, else the CPU."""
    return "cuda" if ray.get_gpu_ids() else "cpu"
