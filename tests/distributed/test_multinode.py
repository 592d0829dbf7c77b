"""A campaign on a Ray cluster of several nodes on one machine (``ray.cluster_utils.Cluster``: a head and
worker nodes, each its own raylet with one CPU and a custom resource naming it), its storage at a
``file://`` URI standing in for a bucket, losing the node of a running trial (the default run), or
first the node of a generator worker while the generators run and then that of a trial (slow); or
its driver (``dfq-search run --address``, a subprocess) killed mid-campaign and resumed while the
worker nodes stay up.

What runs where: the driver on the head (no CPU: no trial or generator runs there); the two generator
workers on two worker nodes (one CPU each; a third worker node, when there is one, free for a restart);
the buffer shards one per node; two trials at a time on the worker nodes left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from dfq_search.bank import BankHeader, SampleBank, Samples  # noqa: E402
from dfq_search.bank.shard import ShardEntry  # noqa: E402
from dfq_search.distributed import SampleBuffer, init, shutdown  # noqa: E402
from dfq_search.distributed.buffer import owned  # noqa: E402
from dfq_search.distributed.campaign import _configs  # noqa: E402
from dfq_search.distributed.runner import RayRunner, surviving  # noqa: E402
from dfq_search.distributed.session import NAMESPACE  # noqa: E402
from dfq_search.search import campaign as campaign_module  # noqa: E402
from dfq_search.search.campaign import CampaignOptions, run_campaign  # noqa: E402
from dfq_search.search.objective import FidelityScorer  # noqa: E402
from dfq_search.search.space import parse_space  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules

# A lost node noticed in about 2 s (Ray's default health check takes tens of seconds).
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
               "health_check_failure_threshold": 4}  # fmt: skip
BATCH = 32  # the gdfq and lrq presets' generator batch
GENERATORS = ("gdfq-0", "lrq-1")


def space(trials: int, iters: int, steps: int, keep_after: int, shards: int) -> dict:
    return {
        "model": {"name": "tiny_resnet"},
        "bits": {"weight": {"_default": [2, 4], "_first_last": [8]},
                 "activation": {"_default": [4, 8], "_first_last": [8]}},
        "method": {"kind": "ptq", "ptq": {"recon.iters": iters, "recon.batch_size": 16}},
        "samples": {"source": "generator", "generators": ["gdfq", "lrq"], "generator_steps": steps,
                    "keep_after": keep_after, "calibration": 32, "heldout": 32, "buffer_shards": shards},
        "objective": {"mode": "pareto", "metric": "kl", "reports": 3},
        "search": {"trials": trials, "sampler": "random", "seed": 0, "concurrency": 2, "warm_start": [],
                   "max_failures": 1, "refine_top": 1, "refine_seeds": 1},
        "resources": {"trial_cpu": 1, "worker_cpu": 1},
    }  # fmt: skip


class TracedScorer(FidelityScorer):
    """The campaign's scorer, appending (trial, node, fraction) to the file ``trace`` at every report,
    what the test watches; until the file ``release`` exists, a trial's intermediate report waits for
    it: the trial is still running when the test removes its node (however fast its last reports)."""

    trace = release = ""

    def __call__(self, q, fraction: float = 1.0) -> dict:
        try:
            trial = ray.tune.get_context().get_trial_id()
        except Exception:  # a rerun (a Ray task, no Tune context)
            trial = None
        line = {"trial": trial, "node": ray.get_runtime_context().get_node_id(), "fraction": fraction,
                "pid": os.getpid()}  # fmt: skip
        with open(self.trace, "a") as f:
            f.write(json.dumps(line) + "\n")
        deadline = time.monotonic() + 600
        while trial and fraction < 1 and not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.1)
        return super().__call__(q, fraction)


def ended(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie no parent reaped counts as ended)."""
    import psutil  # a dependency of Ray

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def reports(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def cluster(request):
    """A head of no CPU and ``request.param`` worker nodes of one CPU each."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"node_head": 1},
                                                      "_system_config": FAST_HEALTH})  # fmt: skip
    workers = [c.add_node(num_cpus=1, resources={f"node_w{i}": 1}) for i in range(request.param)]
    c.wait_for_nodes()
    init(c.address)  # the project's own join (it probes the address first)
    yield c, workers
    shutdown()
    c.shutdown()


def status(worker: str) -> dict:
    try:
        return ray.get(ray.get_actor(f"lossy-samples/worker/{worker}", namespace=NAMESPACE).status.remote(),
                       timeout=10)  # fmt: skip
    except (ValueError, ray.exceptions.RayError):  # not started yet, or restarting
        return {}


def shard_nodes() -> list[str]:
    return [s["node"] for s in SampleBuffer.connect("lossy-samples").stats()["shards"]]


def published(worker: str) -> int:
    try:
        return SampleBuffer.connect("lossy-samples").published().get(worker, {}).get("step", -1)
    except Exception:  # the buffer is not started yet
        return -1


def remove(c: Cluster, workers: list, node: str) -> None:
    """Lose ``node`` at once (its raylet and every process on it killed, no graceful shutdown)."""
    c.remove_node(next(w for w in workers if w.node_id == node), allow_graceful=False)


def held_steps(parts) -> dict[str, Counter]:
    """{generator: Counter(step -> samples)} of ``parts``: (generator names, steps) pairs."""
    out: dict[str, Counter] = {}
    for names, steps in parts:
        for name, step in zip(names, steps, strict=True):
            out.setdefault(str(name), Counter())[int(step)] += 1
    return out


def held_by(buffer: SampleBuffer, stats: list[dict]) -> dict[str, Counter]:
    """What every shard of ``buffer`` holds, all of it (a draw of as many as it holds has no repeats)."""
    answers = ray.get([s.sample.remote(st["filled"]) for s, st in zip(buffer.shards, stats, strict=True)])
    parts = ray.get([refs[0] for refs, _ in answers])
    return held_steps((p["generator"], p["step"]) for p in parts)


def run_lossy(c: Cluster, workers: list, tmp_path: Path, patience, *, generating_loss: bool, trials: int,
              iters: int, steps: int, keep_after: int) -> dict:  # fmt: skip
    """Run the campaign 'lossy' with a buffer shard per node; with ``generating_loss``, remove the node of
    generator gdfq-0 once it has published and stepped on; then the node of the first trial that reports
    on a worker node. Returns what was seen."""
    trace, uri = tmp_path / "trace.jsonl", f"file://{tmp_path}/bucket"
    shape = space(trials, iters, steps, keep_after, shards=len(workers) + 1)
    opts = CampaignOptions(space=parse_space(shape), storage=uri, name="lossy", address=c.address)
    seen: dict = {"lines": [], "trace": trace, "uri": uri, "head": c.head_node.node_id, "times": {},
                  "shards": len(workers) + 1, "first": None}  # fmt: skip
    start = time.monotonic()
    campaign = threading.Thread(target=_campaign, args=(opts, seen), daemon=True)
    campaign.start()
    every = seen["every"] = _configs(opts.space.samples)[0].publish_every
    far = every + 2 if generating_loss else 0  # before a loss: one that restarts from a published state
    patience.wait_for("the generators to publish and step on",
                      lambda: published("gdfq-0") >= (every if far else -1)
                      and all(status(g).get("step", 0) > far for g in GENERATORS), 180,
                      alive=campaign.is_alive)  # fmt: skip
    seen["shards_before"] = shard_nodes()
    seen["generators_before"] = {g: status(g)["node"] for g in GENERATORS}
    if generating_loss:
        seen["first"] = seen["generators_before"]["gdfq-0"]
        remove(c, workers, seen["first"])
        seen["times"]["first lost"] = time.monotonic() - start

    def hit() -> dict | None:  # an intermediate report of a trial on a node still up
        return next((r for r in reports(trace) if r["trial"] and r["fraction"] < 1
                     and r["node"] != seen["first"]), None)  # fmt: skip

    patience.wait_for("a trial's first report", lambda: hit() is not None, 240, alive=campaign.is_alive)
    seen["hit"] = hit()
    seen["shards_at_hit"] = shard_nodes()
    remove(c, workers, seen["hit"]["node"])
    seen["times"]["trial node lost"] = time.monotonic() - start
    # a worker outlives its killed raylet for a moment: released before it ended, the held trial could
    # finish there, and the loss fall on the next trial of that (reused) worker
    patience.wait_for("the lost node's trial process to end", lambda: ended(seen["hit"]["pid"]), 60)
    (tmp_path / "release").touch()  # the trials held at their first report go on
    campaign.join(timeout=patience(400))
    seen["times"]["campaign done"] = time.monotonic() - start
    assert not campaign.is_alive(), "the campaign did not end after its nodes were lost"
    assert "error" not in seen, f"the campaign failed: {seen['error']!r}\n" + "\n".join(seen["lines"])
    return seen


def _campaign(opts: CampaignOptions, seen: dict) -> None:
    try:
        seen["result"] = run_campaign(opts, seen["lines"].append, runner=RayRunner())
    except BaseException as err:  # the test's thread reports it
        seen["error"] = err


def check_lossy(seen: dict, tmp_path: Path, *, trials: int, steps: int, keep_after: int) -> None:
    first, hit, log = seen["first"], seen["hit"], "\n".join(seen["lines"])
    lost = {hit["node"]} | ({first} if first else set())
    # before any loss: a shard on every node, the generators on two worker nodes
    assert len(set(seen["shards_before"])) == seen["shards"], seen["shards_before"]
    assert (
        len(set(seen["generators_before"].values())) == 2
        and seen["head"] not in seen["generators_before"].values()
    )
    assert hit["node"] in seen["shards_at_hit"]  # the trial's node held a shard too

    if first:  # the generator worker lost with its node restarted on a node still up, from its published step
        gdfq = re.search(
            r"generator gdfq-0: (\d+) steps on node (\w+), restarted, resumed from step (\d+)", log
        )
        assert gdfq, log
        assert int(gdfq[1]) == steps and gdfq[2] != first and int(gdfq[3]) >= seen["every"]

    # no sample lost or duplicated: the bank holds each kept step of each generator once, and so does the
    # buffer, whose lost shards were rebuilt from it on the nodes left
    bank = SampleBank.open(f"{seen['uri']}/lossy/bank")
    kept = {g: Counter({s: BATCH for s in range(keep_after, steps)}) for g in GENERATORS}
    assert held_steps(([s.generator] * len(s), s.step.tolist()) for s in bank.iter_samples()) == kept
    buffer = SampleBuffer.connect("lossy-samples")
    stats = buffer.stats()["shards"]
    assert held_by(buffer, stats) == kept
    assert not {st["node"] for st in stats} & lost
    gone = [i for i, (a, b) in enumerate(zip(seen["shards_before"], seen["shards_at_hit"], strict=True))
            if a in lost or b in lost]  # fmt: skip
    assert len(gone) >= len(lost) and all(stats[i]["rebuilt"] for i in gone), (gone, stats)
    # the trial node's loss came after the generation, when every shard held chunks of both generators
    assert all(stats[i]["restored"] > 0 for i in gone if seen["shards_at_hit"][i] == hit["node"])

    # every requested trial finished once, complete; the one whose node was lost after one retry elsewhere
    run = tmp_path / "bucket" / "lossy"
    rows = {r["trial"]: r for r in pq.read_table(run / "results.parquet").to_pylist()}
    assert len(rows) == trials and {r["status"] for r in rows.values()} == {"complete"}, rows
    assert {t: r["retries"] for t, r in rows.items()} == {t: int(t == hit["trial"]) for t in rows}
    assert rows[hit["trial"]]["node"] not in lost
    assert all(len(json.loads(r["reports"])) == 3 for r in rows.values())  # the retry's own reports only
    for t in rows:
        finals = [
            x for x in (run / f"trial_{t}" / "result.json").read_text().splitlines() if '"fidelity": 3' in x
        ]
        assert len(finals) == 1, (t, finals)
    trial_nodes = {r["node"] for r in reports(seen["trace"]) if r["trial"]}
    assert len(trial_nodes) >= 2 and seen["head"] not in trial_nodes
    refined = list((run / "refine").glob("*/model.pt"))
    assert refined and "reruns with other reconstruction seeds" in log


def lossy_campaign(cluster, tmp_path: Path, patience, monkeypatch, generating_loss: bool, iters: int,
                   **shape) -> None:  # fmt: skip
    traced = type("Traced", (TracedScorer,), {"trace": str(tmp_path / "trace.jsonl"),
                                              "release": str(tmp_path / "release")})  # fmt: skip
    monkeypatch.setattr(campaign_module, "FidelityScorer", traced)
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(tmp_path / "cache"))  # the URI campaign's local mirror
    seen = run_lossy(*cluster, tmp_path, patience, generating_loss=generating_loss, iters=iters, **shape)
    print(seen["times"])
    check_lossy(seen, tmp_path, **shape)


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_a_campaign_loses_the_node_of_a_running_trial_and_a_shard_and_completes(
    cluster, tmp_path, patience, monkeypatch
):
    lossy_campaign(
        cluster, tmp_path, patience, monkeypatch, False, iters=20, trials=3, steps=16, keep_after=4
    )


@pytest.mark.slow
@pytest.mark.parametrize("cluster", [3], indirect=True)
def test_a_campaign_loses_a_generating_node_and_a_trial_node_and_completes(
    cluster, tmp_path, patience, monkeypatch
):
    lossy_campaign(cluster, tmp_path, patience, monkeypatch, True, iters=20, trials=4, steps=32, keep_after=4)


@pytest.mark.slow
@pytest.mark.parametrize("cluster", [3], indirect=True)
def test_a_longer_campaign_loses_two_nodes_and_completes(cluster, tmp_path, patience, monkeypatch):
    lossy_campaign(
        cluster, tmp_path, patience, monkeypatch, True, iters=100, trials=8, steps=120, keep_after=20
    )


def test_a_rebuilt_shard_owns_what_it_wrote_and_its_share_of_the_rest():
    def entry(writer: str, first: int) -> ShardEntry:
        return ShardEntry(f"shards/{writer}-{first}", 8, 1, "", "g", "", first, first + 1, writer)

    older = [entry("", 0), entry("old/0", 2), entry("", 4)]  # another run's, and the CLI's
    mine = [entry("run/1", 6), entry("run/0", 8), entry("run/1", 10)]
    entries = [older[0], mine[0], older[1], mine[1], older[2], mine[2]]  # in commit order
    held = [owned(entries, f"run/{i}", 2) for i in range(2)]
    assert held[0] == [older[0], mine[1], older[2]] and held[1] == [mine[0], older[1], mine[2]]
    assert sorted(held[0] + held[1], key=entries.index) == entries  # a partition: each entry once
    assert owned(entries, "run/1", 2) == held[1]  # the same after a restart: what a rebuild reloads


def test_a_retried_trials_reports_are_those_of_its_last_attempt():
    assert surviving([1, 2, 3], [0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]
    assert surviving([1, 1, 2, 3], [0.5, 0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]  # started again
    assert surviving([1, 2, 2, 3], [0.1, 0.9, 0.2, 0.3]) == [0.1, 0.2, 0.3]  # from its checkpoint at 1
    assert surviving([1, 2, 3, 3], [0.1, 0.2, 0.3, 0.3]) == [0.1, 0.2, 0.3]  # from its final checkpoint


def test_a_killed_shard_reloads_what_it_wrote_through_and_drops_a_chunk_it_holds(tmp_path, patience):
    init(num_cpus=1, namespace="dfq_search_multinode_unit")
    try:
        header = BankHeader("f" * 16, (1, 4, 4), 10)
        SampleBank.create(str(tmp_path / "bank"), header)
        buffer = SampleBuffer.start("wt", 64, (1, 4, 4), 10, shards=2, namespace="dfq_search_multinode_unit",
                                    bank=(str(tmp_path / "bank"), header.fingerprint))  # fmt: skip

        def chunk(first: int) -> Samples:
            steps = torch.arange(first, first + 4).repeat_interleave(2)
            return Samples(torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long), steps, None, "g")

        ray.get([buffer.shards[i % 2].add.remote(chunk(4 * i)) for i in range(4)])
        assert SampleBank.open(str(tmp_path / "bank")).info()["samples"] == 32  # written through
        ray.kill(buffer.shards[1], no_restart=False)  # asynchronous: a call may still reach the old actor

        def rebuilt() -> bool:
            return ray.get(buffer.shards[1].stats.remote(), timeout=patience(60))["rebuilt"]

        patience.wait_for("the killed shard to be rebuilt from the bank", rebuilt, 60)
        again = ray.get(buffer.shards[1].add.remote(chunk(4)), timeout=patience(60))  # a retried add
        stats = buffer.stats()["shards"]
        assert stats[1]["rebuilt"] and stats[1]["restored"] == 16 and again["filled"] == 16
        assert SampleBank.open(str(tmp_path / "bank")).info()["samples"] == 32  # not written twice
        assert held_by(buffer, stats) == {"g": Counter({step: 2 for step in range(16)})}  # each once
    finally:
        shutdown()


DONE = re.compile(r"trial \d+/\d+ (\S+): (?!FAILED)")  # a ProgressLine of a finished trial
OUTPUTS = ("campaign.json", "sensitivity.json", "results.parquet", "pareto.png", "best_plan.yaml",
           "best_model.pt", "summary.json")  # fmt: skip


def driver(c: Cluster, tmp_path: Path, trials: int) -> list[str]:
    """``dfq-search run`` of the campaign 'driven' on cluster ``c`` (generator samples, the buffer's
    shards one per node), stored at a ``file://`` URI."""
    path = tmp_path / "driven.yaml"
    path.write_text(yaml.safe_dump(space(trials, iters=40, steps=16, keep_after=4, shards=3)))
    return [sys.executable, "-m", "dfq_search.cli", "run", "--address", c.address, "--space", str(path),
            "--storage", f"file://{tmp_path}/bucket", "--name", "driven"]  # fmt: skip


def finished(log: Path) -> list[str]:
    return DONE.findall(log.read_text()) if log.exists() else []


def kill_after_two(argv: list[str], env: dict, log: Path, patience) -> list[str]:
    """Start the driver, SIGKILL its process group once two trials have finished; the trials it had
    finished."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        patience.wait_for("two finished trials", lambda: len(finished(log)) >= 2, 300,
                          alive=lambda: proc.poll() is None,
                          progress=lambda: log.read_text()[-3000:])  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; the worker nodes stay up
        proc.wait()
    return finished(log)


def actors() -> list[dict]:
    """Every actor the cluster's GCS knows of, dead ones included (``ray.util.state`` needs a dashboard)."""
    from ray._private import state

    return list(state.actors().values())


def left_on_cluster() -> list[str]:
    """The actors still alive and the placement groups not removed: once every driver has gone, none
    (a dead driver's named actor or placement group would stand in the next one's way)."""
    alive = [a["Name"] or a["ActorClassName"] for a in actors() if a["State"] != "DEAD"]
    groups = ray.util.placement_group_table().values()
    return alive + [f"placement group {g['placement_group_id']}" for g in groups if g["state"] != "REMOVED"]


@pytest.mark.slow
@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_the_driver_killed_mid_campaign_resumes_on_the_same_cluster(cluster, tmp_path, patience):
    c, trials = cluster[0], 5
    env = {**os.environ, "DFQ_SEARCH_CACHE": str(tmp_path / "cache"), "OMP_WAIT_POLICY": "PASSIVE"}
    argv, start = driver(c, tmp_path, trials), time.monotonic()
    before = kill_after_two(argv, env, tmp_path / "first.log", patience)
    killed = time.monotonic() - start
    assert 2 <= len(before) < trials, "the kill must land after two finished trials and before the end"
    resumed = patience.run([*argv, "--resume"], "the resumed campaign", 400, capture_output=True, text=True,
                           env=env)  # fmt: skip
    print({"killed at": killed, "resumed in": time.monotonic() - start - killed})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "no generation" in resumed.stdout  # the samples reloaded from the bank, none generated again
    run = tmp_path / "bucket" / "driven"
    rows = {r["trial"]: r for r in pq.read_table(run / "results.parquet").to_pylist()}
    assert pq.read_table(run / "results.parquet").num_rows == len(rows) == trials
    assert {r["status"] for r in rows.values()} == {"complete"}, rows
    assert set(before) <= set(rows)
    again = set(DONE.findall(resumed.stdout))
    # a trial finished before the kill is not run again: or, killed between its final report and Tune's
    # record of it, it is restarted and replays that report from the memo (no compute)
    assert all(t not in again or rows[t]["replayed"] for t in before), (before, again)
    assert all(len(json.loads(r["reports"])) == 3 for r in rows.values())
    assert c.head_node.node_id not in {r["node"] for r in rows.values()}
    for name in OUTPUTS:
        assert (run / name).is_file(), name
    assert list((run / "refine").glob("*/model.pt"))
    patience.wait_for("the drivers' actors and placement groups to go", lambda: not left_on_cluster(), 60,
                      progress=lambda: str(left_on_cluster()))  # fmt: skip
    shards = [a["JobID"] for a in actors() if re.fullmatch(r"driven-samples/\d+", a["Name"])]
    assert len(shards) == 2 * 3 and len(set(shards)) == 2  # the resumed driver's shards were its own
