"""``cluster.yaml``'s node types on one machine, for trying the autoscaler locally: the config of Ray's
fake multi-node provider (Ray's "testing autoscaling locally" setup: each worker "node" a raylet that
the autoscaler starts on this machine) derived from a cluster file, and a head node that runs it.

Taken from the cluster file (the one source of truth): the worker node types' names, resources and
min/max workers, the global ``max_workers`` and ``upscaling_speed``, the head's resources. What
differs, and why:

- ``provider``: ``fake_multinode``; no docker, auth, file mounts or setup/start commands (the nodes
  share this machine's environment);
- the head's node type is named ``ray.head.default``, the name Ray's fake provider gives its head;
- ``idle_timeout_minutes`` is short (seconds), so that a scale-down is seen within a benchmark;
- GPUs are logical: Ray schedules on them, no device stands behind them (trials run on the CPU);
- ``max_cpus`` caps the CPUs a node type advertises, for a small machine (Ray starts one worker
  process per advertised CPU on each node);
- every worker node's object store is small (``object_store_mib``).

The config is complete as the autoscaler reads it (``ray up`` fills nothing in for ``ray start
--autoscaling-config``). Ray's ``cluster_utils.AutoscalingCluster`` is not used: its start and
shutdown run ``ray stop --force``, which ends every Ray process of the machine, and it reads an
``example.yaml`` that Ray's wheel does not ship.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE
from ray.cluster_utils import Cluster

from dfq_search.errors import DfqError

FAKE_PROVIDER = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True}  # fmt: skip
# What the autoscaler reads from a config that ``ray up`` would have filled in.
_LISTS = ["cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
          "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
          "worker_start_ray_commands"]  # fmt: skip
EMPTY: dict[str, Any] = {"auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False}
EMPTY |= {key: [] for key in _LISTS}
# The autoscaler's loop period on the fake cluster (its default is 5 s), as AutoscalingCluster sets it.
ENV = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}


def load_cluster_file(path: str | Path) -> dict[str, Any]:
    """A Ray cluster file (``cluster.yaml``) as a dict; a clear error when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise DfqError("cluster file not found", str(path), "a Ray cluster YAML file", "pass cluster.yaml")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DfqError("cluster file is not YAML", str(path), str(err).splitlines()[0], "fix it") from None
    _check_cluster(config, str(path))
    return config


def _check_cluster(config: Any, where: str) -> None:
    types = config.get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict) or not types:
        raise DfqError("not a cluster file with node types", where, "a mapping with available_node_types",
                       "pass a Ray cluster file such as cluster.yaml")  # fmt: skip
    if config.get("head_node_type") not in types:
        raise DfqError("head_node_type is not one of available_node_types", config.get("head_node_type"),
                       f"one of {sorted(types)}", "name the head's node type")  # fmt: skip
    for name, spec in types.items():
        resources = spec.get("resources") if isinstance(spec, dict) else None
        if not isinstance(resources, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in resources.values()
        ):  # fmt: skip
            raise DfqError(f"node type {name}: resources", resources, "a mapping of name to integer >= 0",
                           "give every node type its resources, e.g. {CPU: 4, GPU: 1}")  # fmt: skip
        low, high = spec.get("min_workers", 0), spec.get("max_workers", config.get("max_workers", 0))
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
            raise DfqError(f"node type {name}: min_workers/max_workers", (low, high),
                           "integers with 0 <= min_workers <= max_workers", "fix the counts")  # fmt: skip


def fake_config(
    cluster: dict[str, Any], *, gcs_address: str | None = None, idle_timeout_minutes: float = 0.2,
    max_cpus: int | None = None, object_store_mib: int = 200,
) -> dict[str, Any]:  # fmt: skip
    """The fake multi-node config of ``cluster`` (see the module's docstring for what differs);
    ``gcs_address``: the head's HOST:PORT (the fake provider's default is this machine's port 6379)."""
    _check_cluster(cluster, "<cluster config>")
    if not isinstance(idle_timeout_minutes, (int, float)) or idle_timeout_minutes < 0:
        raise DfqError("idle_timeout_minutes", idle_timeout_minutes, "a number >= 0", "pass e.g. 0.2")
    if max_cpus is not None and (not isinstance(max_cpus, int) or max_cpus < 1):
        raise DfqError("max_cpus", max_cpus, "an integer >= 1 or None", "pass e.g. 1")
    head = cluster["head_node_type"]
    types = {FAKE_HEAD_NODE_TYPE: {"resources": _resources(cluster["available_node_types"][head], max_cpus),
                                   "node_config": {}, "max_workers": 0}}  # fmt: skip
    for name, spec in cluster["available_node_types"].items():
        if name != head:
            resources = _resources(spec, max_cpus) | {"object_store_memory": object_store_mib * 2**20}
            low, high = spec.get("min_workers", 0), spec.get("max_workers", cluster.get("max_workers", 0))
            types[name] = {"resources": resources, "node_config": {}, "min_workers": low, "max_workers": high}
    provider = FAKE_PROVIDER | ({"gcs_address": gcs_address} if gcs_address else {})
    return copy.deepcopy(EMPTY) | {
        "cluster_name": f"{cluster.get('cluster_name', 'default')}-fake",
        "max_workers": cluster.get("max_workers", 2),  # Ray's default
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": provider,
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
    }


def _resources(spec: dict[str, Any], max_cpus: int | None) -> dict[str, int]:
    out = dict(spec["resources"])
    if max_cpus is not None and "CPU" in out:
        out["CPU"] = min(out["CPU"], max_cpus)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalAutoscalingCluster:
    """A head node on this machine whose autoscaler launches the worker nodes of ``fake_config(cluster,
    **options)`` here. Its processes, and those of the worker nodes it launched, are stopped by
    :meth:`shutdown` (by process id, those of this cluster's Ray session only)."""

    def __init__(self, cluster: dict[str, Any], **options: Any) -> None:
        self.host, self.port = ray.util.get_node_ip_address(), _free_port()
        self.config = fake_config(cluster, gcs_address=f"{self.host}:{self.port}", **options)
        self._cluster: Cluster | None = None
        self._file = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> str:
        """Start the head (its autoscaler reads the fake config); returns its address."""
        fd, self._file = tempfile.mkstemp(prefix="dfq-fake-cluster-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.config, f)
        os.environ.update(ENV)  # read by the autoscaler's process, which inherits this environment
        head = dict(self.config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"])
        # the head's id is the one the fake provider knows its head by
        args = {"num_cpus": head.pop("CPU", 0), "num_gpus": head.pop("GPU", 0), "resources": head,
                "gcs_server_port": self.port, "autoscaling_config": self._file,
                "object_store_memory": 200 * 2**20,
                "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}}  # fmt: skip
        self._cluster = Cluster(initialize_head=True, head_node_args=args)
        return self.address

    @property
    def session(self) -> str | None:
        """The name of the head's Ray session (in the command line of every process of the cluster)."""
        return self._cluster.head_node.session_name if self._cluster and self._cluster.head_node else None

    def worker_nodes(self) -> list[dict[str, Any]]:
        """The live worker nodes (``ray.nodes()`` rows of every node but the head); needs ``ray.init``."""
        return [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != FAKE_HEAD_NODE_ID]

    def shutdown(self) -> None:
        """Stop the head, then every process left of this cluster's session (the worker nodes' raylets
        outlive the autoscaler that started them). Safe to call twice, or after a failed start."""
        session = self.session
        if self._cluster is not None:
            try:
                self._cluster.shutdown()
            finally:
                self._cluster = None
                _kill_session(session)
        if self._file:
            Path(self._file).unlink(missing_ok=True)
            self._file = ""


def _kill_session(session: str | None, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, every process whose command line names ``session``
    (a Ray session's unique name: its raylets, agents and workers), this process excepted."""
    if not session:
        return
    import psutil  # shipped with Ray (ray/thirdparty_files, on the path once ray is imported)

    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(session in arg for arg in proc.info["cmdline"] or ()):
                proc.terminate()
                mine.append(proc)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
