"""Starting or joining Ray, and the resources an actor asks for (every Ray call of the project is in
this package; Ray's API moves between releases, so the calls stay few and in one place)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any
from urllib.parse import urlsplit

import ray

from dfq_search.errors import DfqError

NAMESPACE = "dfq_search"
# Tune's console output: the legacy engine (silent at verbose=0; the campaign prints its own lines),
# and no warning about frequent experiment snapshots (a campaign of short trials makes many).
QUIET = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
PROBE_S = 3.0  # how long the head's port may take to answer (Ray itself retries for minutes)
_ADDRESS_FORMS = "'auto', HOST:PORT (the head's GCS port, 6379 by default) or ray://HOST:PORT"


def check_address(address: str | None) -> None:
    """Refuse, before any compute, a Ray address that is not 'auto', HOST:PORT or ray://HOST:PORT, whose
    host does not resolve or whose port does not answer within ``PROBE_S`` seconds (ray.init would
    retry such an address for minutes). 'auto' and None are left to :func:`init`."""
    if address is None or address == "auto":
        return
    if not isinstance(address, str) or not address.strip():
        raise DfqError("bad Ray address", address, f"one of {_ADDRESS_FORMS}", "pass e.g. --address auto")
    parts = urlsplit(address if address.startswith("ray://") else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("", "ray") or not parts.hostname or port is None or not 0 < port < 65536 or (
        parts.path or parts.query or parts.fragment or parts.username
    ):  # fmt: skip
        raise DfqError(
            "bad Ray address", address, f"one of {_ADDRESS_FORMS}, with a port in 1..65535",
            "pass --address auto on a node of the cluster, or the head's HOST:6379",
        )  # fmt: skip
    try:
        socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise DfqError(
            f"Ray address: host {parts.hostname!r} not found", address,
            f"a host name or IP that resolves ({err})", "check the head node's address",
        ) from None  # fmt: skip
    try:
        socket.create_connection((parts.hostname, port), timeout=PROBE_S).close()
    except OSError as err:
        raise DfqError(
            "no Ray cluster answers at the address", address,
            f"a running Ray head listening there ({err.strerror or type(err).__name__})",
            "start the cluster ('ray up cluster.yaml' or 'ray start --head') or fix --address",
        ) from None  # fmt: skip


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
        check_address(address)
        try:
            ray.init(address=address, namespace=namespace, **kwargs)
        except ConnectionError as err:
            raise DfqError(
                "cannot connect to the Ray cluster", address, " ".join(str(err).split())[:300],
                "start the cluster ('ray up cluster.yaml' or 'ray start --head') or fix --address",
            ) from None  # fmt: skip
        return
    kwargs.setdefault("object_store_memory", 512 * 2**20)
    kwargs.setdefault("logging_level", logging.ERROR)
    # "local": a Ray of its own, even when the machine runs a cluster started with `ray start` (which a
    # bare ray.init would join, and then refuse num_cpus); --address auto is the way to join that one
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace=namespace,
             log_to_driver=False, _node_ip_address="127.0.0.1", **kwargs)  # fmt: skip


def shutdown() -> None:
    ray.shutdown()


def gpu_fraction(requested: float) -> float:
    """``requested`` GPUs per actor when the cluster has GPUs, else 0 (the actor runs on CPU)."""
    return requested if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def trial_device() -> str:
    """The device inside a trial's worker or task: its GPU when Ray gave it one and torch sees it."""
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def node_id() -> str:
    """The Ray node this process runs on (hex): recorded with every trial report, generator worker
    status and buffer shard statistics, so a campaign shows where its parts ran."""
    return ray.get_runtime_context().get_node_id()


def spread_nodes() -> list[str]:
    """The ids of the cluster's live nodes, this process's first (where actors are spread over)."""
    here = node_id()
    return [here, *sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)]


def on_node(node: str) -> Any:
    """A scheduling strategy for ``node`` that falls back to any other node when it is gone (soft):
    where a restarted actor goes when its node was lost."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node, soft=True)


def actor_device() -> str:
    """The device inside an actor: its assigned GPU when Ray gave it one, else the CPU."""
    return "cuda" if ray.get_gpu_ids() else "cpu"
