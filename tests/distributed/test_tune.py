"""The campaign on a local Ray, end to end through the CLI (subprocesses: each run starts its own Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dfq_search.search.results import STATUSES

ROOT = Path(__file__).resolve().parents[2]


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "dfq_search.cli", *argv]


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "DFQ_SEARCH_CACHE": str(cache), "OMP_WAIT_POLICY": "PASSIVE"}


def test_three_trial_campaign_writes_every_output(tmp_path, shared_cache):
    argv = cli(
        "run", "--space", "tiny_smoke", "--storage", str(tmp_path), "--num-cpus", "2", "--name", "smoke"
    )
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(shared_cache), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pareto front" in proc.stdout and "Traceback" not in proc.stderr
    run = tmp_path / "smoke"
    rows = pq.read_table(run / "results.parquet").to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} <= set(STATUSES)
    assert all(len(json.loads(r["reports"])) >= 1 for r in rows)
    for name in ("pareto.png", "best_model.pt", "summary.json", "sensitivity.json", "campaign.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))

    from dfq_search.checkpoint import load_quantized
    from dfq_search.models import create_model
    from dfq_search.quant import BitPlan, trace_layers
    from dfq_search.search.define import PlanSpace
    from dfq_search.search.space import load_space

    plan = BitPlan(yaml.safe_load((run / "best_plan.yaml").read_text()))
    bundle = create_model("tiny_resnet")
    layers = trace_layers(bundle.model, bundle.preprocess.example_input())
    plans = PlanSpace(load_space("tiny_smoke"), layers)
    assert plans.excess(plans.cost(plan.resolve([i.name for i in layers]))) <= 1e-9  # the best fits
    _, meta = load_quantized(run / "best_model.pt")
    assert meta["plan"] == plan

    summary = json.loads((run / "summary.json").read_text())
    again = subprocess.run(cli("report", str(run)), capture_output=True, text=True,
                           env=env(shared_cache), timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert summary["best"]["trial"] in again.stdout.split("best:")[1]


def smoke_space(tmp_path: Path, name: str, iters: int, trials: int | None = None, **search) -> Path:
    """tiny_smoke with longer or shorter trials (and another trial count, other ``search`` keys), as a
    file named ``name``."""
    space = yaml.safe_load((ROOT / "search_spaces" / "tiny_smoke.yaml").read_text())
    space["method"]["ptq"]["iters"] = iters
    if trials is not None:
        space["search"]["trials"] = trials
    space["search"] |= search
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _finished(run: Path) -> dict[str, dict]:
    """The final report (fidelity 2 of tiny_smoke's 2) of every trial whose result.json has it."""
    out = {}
    for d in run.glob("trial_*"):
        lines = (d / "result.json").read_text().splitlines() if (d / "result.json").exists() else []
        final = [json.loads(x) for x in lines if x.endswith("}") and '"fidelity": 2' in x]
        if final:
            out[d.name] = final[-1]
    return out


def test_campaign_killed_after_two_trials_resumes_without_rerunning(tmp_path, shared_cache):
    path = smoke_space(tmp_path, "slow", iters=1000)  # trials of seconds: the kill lands mid-campaign
    argv = cli(
        "run",
        "--space",
        str(path),
        "--storage",
        str(tmp_path),
        "--trials",
        "5",
        "--num-cpus",
        "2",
        "--name",
        "slow",
    )
    run = tmp_path / "slow"
    proc = subprocess.Popen(argv, env=env(shared_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and len(_finished(run)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    before = _finished(run)
    assert 2 <= len(before) < 5, "the kill must land after two finished trials and before the end"

    resumed = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env(shared_cache),
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = pq.read_table(run / "results.parquet").to_pylist()
    assert len(rows) == 5 and len({r["trial"] for r in rows}) == 5
    assert all(r["status"] in ("complete", "stopped") for r in rows)
    after = _finished(run)
    for name, final in before.items():  # the same final report, or one replayed from the memo (no compute):
        # a trial killed between its final report and Tune's record of it is restarted, and replays
        same = after[name]["timestamp"] == final["timestamp"] and after[name]["score"] == final["score"]
        assert same or after[name].get("replayed") == 1.0, f"{name} was rerun"


def test_run_refuses_an_existing_named_campaign_without_resume(tmp_path, shared_cache):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "campaign.json").write_text("{}")
    argv = cli("run", "--space", "tiny_smoke", "--storage", str(tmp_path), "--name", "mine")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(shared_cache), timeout=120)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "mine" / "campaign.json").read_text() == "{}"  # untouched


def test_campaign_on_a_uri_lives_there_and_resumes_and_reports_from_it(tmp_path, shared_cache):
    """file:// stands in for s3://: Tune writes the trials to the URI, the driver its own files."""
    uri = f"file://{tmp_path}/bucket/campaigns"
    argv = cli("run", "--space", "tiny_smoke", "--storage", uri, "--num-cpus", "2", "--name", "remote")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(shared_cache), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"campaign stored at {uri}/remote" in proc.stdout
    remote = tmp_path / "bucket" / "campaigns" / "remote"
    for name in ("campaign.json", "sensitivity.json", "results.parquet", "pareto.png", "best_plan.yaml",
                 "best_model.pt", "summary.json"):  # fmt: skip
        assert (remote / name).is_file(), name
    finals = {p.parent.name: p.read_text() for p in remote.glob("trial_*/result.json")}
    assert len(finals) == 3

    elsewhere = env(tmp_path / "another-machine")  # an empty cache: no mirror, no samples
    rep = subprocess.run(cli("report", f"{uri}/remote"), capture_output=True, text=True, env=elsewhere,
                         timeout=120)  # fmt: skip
    best = json.loads((remote / "summary.json").read_text())["best"]["trial"]
    assert rep.returncode == 0 and best in rep.stdout.split("best:")[1], rep.stderr[-2000:]
    changed = subprocess.run([*argv, "--resume", "--trials", "5"], capture_output=True, text=True,
                             env=elsewhere, timeout=120)  # fmt: skip
    assert changed.returncode == 2 and "search.trials: 3 -> 5" in changed.stderr
    again = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=elsewhere, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.parent.name: p.read_text() for p in remote.glob("trial_*/result.json")} == finals


def test_time_budget_ends_on_time_with_the_best_so_far(tmp_path, shared_cache):
    path = smoke_space(tmp_path, "timed", iters=20, trials=500)
    argv = cli(
        "run",
        "--space",
        str(path),
        "--storage",
        str(tmp_path),
        "--num-cpus",
        "2",
        "--time-budget",
        "20",
        "--name",
        "timed",
    )
    start = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(shared_cache), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "timed" / "results.parquet").to_pylist()
    assert 1 <= len(rows) < 500  # it stopped starting trials long before the 500th
    assert json.loads((tmp_path / "timed" / "summary.json").read_text())["best"] is not None
    assert time.time() - start < 20 + 150  # the budget, plus start-up and the final outputs


def test_refined_campaign_ships_the_best_mean_plan_and_never_reruns_twice(tmp_path, shared_cache):
    path = smoke_space(tmp_path, "refined", iters=5, trials=4, refine_top=2, refine_seeds=1)
    argv = cli("run", "--space", str(path), "--storage", str(tmp_path), "--num-cpus", "2", "--name", "r")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(shared_cache), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "r"
    kept = sorted((run / "refine").glob("*/model.pt"))
    summary = json.loads((run / "summary.json").read_text())
    best, marks = summary["best"], summary["warm_starts"]
    rerun = {best["trial"], *(m["trial"] for m in marks.values())}  # the finalists and the warm starts
    assert len(kept) >= len(rerun) >= 1 and "reruns with other reconstruction seeds" in proc.stdout
    assert best["refined_runs"] == 2 and len(json.loads(best["refined_scores"])) == 2
    assert all(m["refined_runs"] == 2 for m in marks.values())
    assert (run / "best_model.pt").read_bytes() == (Path(best["checkpoint"]) / "model.pt").read_bytes()

    again = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env(shared_cache),
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "refining" not in again.stdout  # every rerun was kept: none runs again
    assert sorted((run / "refine").glob("*/model.pt")) == kept
    report = subprocess.run(cli("report", str(run)), capture_output=True, text=True, env=env(shared_cache),
                            timeout=120)  # fmt: skip
    assert report.returncode == 0 and json.loads((run / "summary.json").read_text())["best"] == best


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
