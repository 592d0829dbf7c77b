"""Autoscaling, tried locally: ``cluster.yaml``'s node types on Ray's fake multi-node provider (each
worker node a raylet on this machine, launched and terminated by Ray's own autoscaler), and a small
real campaign on it through ``dfq-search run --address``, whose trials ask for a worker's GPU (a
logical one: no device behind it, the trials run on the CPU) and so wait until the autoscaler has
launched workers for them.

The fake cluster is derived from the cluster file by ``dfq_search.distributed.autoscale.fake_config``:
the node types, resources, min/max workers and upscaling speed of the file; the idle timeout short
(``--idle-timeout-s``), each worker's CPUs capped at ``--max-cpus`` for a small machine.

    python benchmarks/autoscaling.py                          # 6 trials, 3 at a time
    python benchmarks/autoscaling.py --trials 8 --concurrency 4 --idle-timeout-s 20

Reported: seconds from the campaign's start to the first worker node up (scale-up), worker nodes
launched (and the most up at once), trials run on each node (``results.parquet``'s ``node``), the
campaign's seconds, and seconds from its end until every worker is released (scale-down). Node state
is polled with ``ray.nodes()``. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_worker_niceness", "0")  # as the tests: trials compete evenly with other jobs
os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")  # the autoscaler's own lines: this script prints its own
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, emit

POLL_S = 0.5
WORKER_LOG = re.compile(r"\(\w+ pid=\d+(, ip=\S+)?\)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", default=str(ROOT / "cluster.yaml"), help="the cluster file mirrored")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=3, help="trials at a time (a worker node each)")
    p.add_argument("--iters", type=int, default=120, help="reconstruction steps per unit (trial length)")
    p.add_argument("--idle-timeout-s", type=float, default=12.0, help="a worker idle this long is released")
    p.add_argument("--max-cpus", type=int, default=1, help="CPUs a fake node advertises at most")
    p.add_argument("--timeout-s", type=float, default=900.0, help="give up on the campaign after this")
    return p.parse_args()


def write_space(folder: Path, args: argparse.Namespace) -> Path:
    """The tests' tiny_smoke space, with ``--trials``, ``--concurrency``, ``--iters`` and one GPU a trial."""
    import yaml

    space = yaml.safe_load((ROOT / "search_spaces" / "tiny_smoke.yaml").read_text())
    space["method"]["ptq"]["recon.iters"] = args.iters
    space["search"] |= {"trials": args.trials, "concurrency": args.concurrency}
    space["resources"] = {"trial_cpu": 1, "trial_gpu": 1}
    path = folder / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


class NodeWatch:
    """When each worker node was first seen up and when released (seconds from ``start``)."""

    def __init__(self, cluster, start: float) -> None:
        self.cluster, self.start = cluster, start
        self.up: dict[str, float] = {}
        self.released: dict[str, float] = {}
        self.most = 0
        self.marks: dict[str, float] = {}
        self.worker_lines = 0

    def poll(self) -> int:
        """Record and print the changes; returns how many workers are up."""
        now, alive = time.monotonic() - self.start, {n["NodeID"] for n in self.cluster.worker_nodes()}
        for node in sorted(alive - set(self.up)):
            self.up[node] = now
            print(f"[{now:6.1f} s] worker node {short(node)} up ({len(alive)} up)", flush=True)
        for node in sorted(set(self.up) - alive - set(self.released)):
            self.released[node] = now
            print(f"[{now:6.1f} s] worker node {short(node)} released ({len(alive)} up)", flush=True)
        self.most = max(self.most, len(alive))
        return len(alive)


def short(node: str | None) -> str:
    """The fake provider numbers its nodes: ffff...00000 the head, ffff...00001 the first worker."""
    return "none" if not node else node[-5:] if node.startswith("fffff") else node[:8]


def campaign(space: Path, storage: Path, address: str, watch: NodeWatch) -> subprocess.Popen:
    argv = [sys.executable, "-m", "dfq_search.cli", "run", "--space", str(space), "--storage", str(storage),
            "--name", "autoscaling", "--address", address]  # fmt: skip
    print("$ dfq-search " + " ".join(argv[3:]), flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    threading.Thread(target=_echo, args=(proc, watch), daemon=True).start()
    return proc


def _echo(proc: subprocess.Popen, watch: NodeWatch) -> None:
    """The campaign's lines, but those Ray forwards from the trials' logs ('(_trainable pid=...)', once
    per node's log monitor: the fake nodes share one log folder); notes when the trials start."""
    for line in proc.stdout:
        if WORKER_LOG.search(line):
            watch.worker_lines += 1
            continue
        if line.startswith("campaign ") and "trials_start" not in watch.marks:
            watch.marks["trials_start"] = time.monotonic() - watch.start
        print(f"  campaign | {line.rstrip()}", flush=True)


def run_campaign(proc: subprocess.Popen, watch: NodeWatch, timeout_s: float) -> float:
    """Poll the nodes until the campaign ends; its seconds. Raises when it fails or runs too long."""
    while proc.poll() is None:
        watch.poll()
        if time.monotonic() - watch.start > timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"the campaign ran past --timeout-s {timeout_s:.0f}")
        time.sleep(POLL_S)
    if proc.returncode != 0:
        raise RuntimeError(f"the campaign failed (exit status {proc.returncode}): see its lines above")
    return time.monotonic() - watch.start


def wait_released(watch: NodeWatch, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while watch.poll() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return watch.poll() == 0


def trials_per_node(run_dir: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    nodes = pq.read_table(run_dir / "results.parquet").column("node").to_pylist()
    return dict(Counter(short(n) for n in nodes))


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    import ray

    from dfq_search.distributed.autoscale import LocalAutoscalingCluster, load_cluster_file

    cluster = LocalAutoscalingCluster(load_cluster_file(args.cluster), max_cpus=args.max_cpus,
                                      idle_timeout_minutes=args.idle_timeout_s / 60)  # fmt: skip
    types = cluster.config["available_node_types"]
    print(f"fake cluster of {Path(args.cluster).name}: " + "; ".join(
        f"{name} {t['resources']} x{t.get('min_workers', 0)}..{t['max_workers']}" for name, t in types.items()
    ), flush=True)  # fmt: skip
    try:
        started = time.monotonic()
        address = cluster.start()
        print(f"head up at {address} in {time.monotonic() - started:.1f} s", flush=True)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        watch = NodeWatch(cluster, time.monotonic())
        seconds = run_campaign(campaign(write_space(tmp, args), tmp, address, watch), watch, args.timeout_s)
        print(f"[{seconds:6.1f} s] campaign done; waiting for the idle workers to be released", flush=True)
        released = wait_released(watch, args.idle_timeout_s + 180)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return figures(watch, seconds, released, trials_per_node(tmp / "autoscaling"), args)


def figures(watch: NodeWatch, seconds: float, released: bool, per_node: dict, args) -> dict:
    up, start = sorted(watch.up.values()), watch.marks.get("trials_start")
    nodes = {
        short(n): {
            "up_s": round(t, 1),
            "released_s": _round(watch.released.get(n)),
            "trials": per_node.pop(short(n), 0),
        }
        for n, t in sorted(watch.up.items(), key=lambda x: x[1])
    }
    return {
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "trials": args.trials, "concurrency": args.concurrency, "idle_timeout_s": args.idle_timeout_s,
        "trials_start_s": _round(start),
        "scale_up_s": _round(up[0] if up else None),
        "nodes_launched": len(watch.up), "most_up_at_once": watch.most,
        "trials_per_node": {k: v["trials"] for k, v in nodes.items()} | per_node,  # per_node: the head's
        "campaign_s": round(seconds, 1),
        "scale_down_s": _round(max(watch.released.values()) - seconds if released and up else None),
        "nodes": nodes, "worker_log_lines": watch.worker_lines,
    }  # fmt: skip


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dfq-autoscaling-") as tmp:
        result = measure(args, Path(tmp))
    print(f"({result.pop('worker_log_lines', 0)} lines forwarded from the trials' logs left out)")
    for key, value in result.items():
        print(f"{key:>16}: {value}")
    emit(result)


if __name__ == "__main__":
    main()
