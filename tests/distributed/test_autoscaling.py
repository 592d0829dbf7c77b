"""The fake multi-node config derived from ``cluster.yaml`` (``dfq_search.distributed.autoscale``): it
mirrors the file's node types and passes Ray's own validation (fast); and Ray's autoscaler, run on it
locally, launches a worker node for a task that asks for a worker's GPU and releases it once idle
(slow). ``benchmarks/autoscaling.py`` runs a campaign on it and measures.

Ray's ``prepare_config`` (what ``ray up`` runs) cannot take a ``fake_multinode`` config: it reads the
provider's defaults from an ``example.yaml`` that Ray's wheel does not ship. The derived config is
complete instead, and checked the way the autoscaler checks what it reads: ``validate_config``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
ray_util = pytest.importorskip("ray.autoscaler._private.util", reason="Ray's config validation (private API)")
pytest.importorskip("jsonschema", reason="Ray's config validation needs jsonschema")

import psutil  # noqa: E402  (shipped with Ray, importable once ray is)
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE  # noqa: E402
from ray.autoscaler._private.providers import _get_node_provider  # noqa: E402

from dfq_search.distributed.autoscale import (  # noqa: E402
    LocalAutoscalingCluster,
    fake_config,
    load_cluster_file,
)
from dfq_search.errors import DfqError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = load_cluster_file(ROOT / "cluster.yaml")
HEAD = CLUSTER["head_node_type"]
WORKERS = {k: v for k, v in CLUSTER["available_node_types"].items() if k != HEAD}


def test_the_fake_config_mirrors_the_node_types_of_cluster_yaml():
    fake = fake_config(CLUSTER)
    types = fake["available_node_types"]
    assert set(types) == set(WORKERS) | {
        FAKE_HEAD_NODE_TYPE
    }  # the head renamed, as the fake provider names it
    assert fake["head_node_type"] == FAKE_HEAD_NODE_TYPE and types[FAKE_HEAD_NODE_TYPE]["max_workers"] == 0
    assert types[FAKE_HEAD_NODE_TYPE]["resources"] == CLUSTER["available_node_types"][HEAD]["resources"]
    assert WORKERS and any(w["resources"].get("GPU", 0) > 0 for w in WORKERS.values())
    for name, spec in WORKERS.items():
        got = dict(types[name]["resources"])
        assert got.pop("object_store_memory") > 0
        assert got == spec["resources"]
        assert (types[name]["min_workers"], types[name]["max_workers"]) == (
            spec["min_workers"],
            spec["max_workers"],
        )
    for key in ("max_workers", "upscaling_speed"):
        assert fake[key] == CLUSTER[key]
    assert 0 < fake["idle_timeout_minutes"] < CLUSTER["idle_timeout_minutes"]
    assert fake["provider"]["type"] == "fake_multinode"


def test_only_the_cpu_count_is_capped():
    fake = fake_config(CLUSTER, max_cpus=1, idle_timeout_minutes=0.1, gcs_address="127.0.0.1:1234")
    for name, spec in WORKERS.items():
        got = fake["available_node_types"][name]["resources"]
        assert got["CPU"] == min(spec["resources"]["CPU"], 1)
        assert {k: v for k, v in got.items() if k not in ("CPU", "object_store_memory")} == {
            k: v for k, v in spec["resources"].items() if k != "CPU"
        }
    assert fake["idle_timeout_minutes"] == 0.1 and fake["provider"]["gcs_address"] == "127.0.0.1:1234"


def test_ray_accepts_the_fake_config(monkeypatch):
    fake = fake_config(CLUSTER, max_cpus=1)
    ray_util.validate_config(copy.deepcopy(fake))  # what the autoscaler runs on the config it reads
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # the fake provider refuses to start without it
    provider = _get_node_provider(fake["provider"], fake["cluster_name"])
    assert type(provider).__name__ == "FakeMultiNodeProvider"
    assert provider.non_terminated_nodes({}) == [provider._head_node_id]  # the head, no worker yet


def test_a_derived_config_follows_its_cluster_file():
    changed = copy.deepcopy(CLUSTER)
    spec = changed["available_node_types"].pop(next(iter(WORKERS)))
    changed["available_node_types"]["ray.worker.big"] = spec | {
        "resources": {"CPU": 8, "GPU": 4},
        "max_workers": 2,
    }
    changed["upscaling_speed"] = 2.5
    fake = fake_config(changed)
    assert fake["available_node_types"]["ray.worker.big"]["resources"]["GPU"] == 4
    assert fake["available_node_types"]["ray.worker.big"]["max_workers"] == 2
    assert fake["upscaling_speed"] == 2.5
    ray_util.validate_config(fake)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.pop("available_node_types"), "node types"),
        (lambda c: c.update(head_node_type="ray.head.gpu"), "head_node_type"),
        (lambda c: c["available_node_types"]["ray.worker.gpu"].update(resources={"GPU": 0.5}), "resources"),
        (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=5), "min_workers"),
    ],
)
def test_a_bad_cluster_config_is_refused_clearly(change, match):
    bad = copy.deepcopy(CLUSTER)
    change(bad)
    with pytest.raises(DfqError, match=match):
        fake_config(bad)


def test_bad_files_and_options_are_refused_clearly(tmp_path):
    with pytest.raises(DfqError, match="not found"):
        load_cluster_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("cluster_name: [unclosed\n")
    with pytest.raises(DfqError, match="not YAML"):
        load_cluster_file(tmp_path / "bad.yaml")
    with pytest.raises(DfqError, match="node types"):  # the local provider's file lists machines instead
        load_cluster_file(ROOT / "cluster_onprem.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(DfqError, match="node types"):
        load_cluster_file(tmp_path / "list.yaml")
    with pytest.raises(DfqError, match="max_cpus"):
        fake_config(CLUSTER, max_cpus=0)
    with pytest.raises(DfqError, match="idle_timeout_minutes"):
        fake_config(CLUSTER, idle_timeout_minutes=-1)


def session_processes(session: str) -> list[int]:
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(session in arg for arg in proc.info["cmdline"] or ()):
                out.append(proc.pid)
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_the_autoscaler_launches_a_gpu_worker_and_releases_it_when_idle(patience):
    """About 30 s idle: the head, one worker node launched for a GPU task, released 6 s after it."""
    cluster = LocalAutoscalingCluster(CLUSTER, max_cpus=1, idle_timeout_minutes=0.1)
    try:
        ray.init(address=cluster.start(), logging_level="ERROR", log_to_driver=False)
        session = cluster.session
        assert cluster.worker_nodes() == []  # nothing runs before a demand

        @ray.remote(num_cpus=1, num_gpus=1)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        ref = where.remote()
        patience.wait_for("a worker node for the GPU task", lambda: len(cluster.worker_nodes()) == 1, 60)
        node = cluster.worker_nodes()[0]
        assert node["Resources"].get("GPU") == 1  # cluster.yaml's GPU worker, its GPU a logical one
        assert ray.get(ref, timeout=patience(60)) == node["NodeID"]
        patience.wait_for("the idle worker's release", lambda: not cluster.worker_nodes(), 60)
    finally:
        ray.shutdown()
        cluster.shutdown()
    time.sleep(0.5)
    assert session_processes(session) == [], "processes of the cluster's session outlived its shutdown"
