"""The campaign on a local Ray, end to end through the CLI (subprocesses: each run starts its own Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def test_three_trial_campaign_writes_every_output(tmp_path, shared_cache, patience):
    argv = cli(
        "run", "--space", "tiny_smoke", "--storage", str(tmp_path), "--num-cpus", "2", "--name", "smoke"
    )
    proc = patience.run(
        argv, "the 3-trial campaign", 300, capture_output=True, text=True, env=env(shared_cache)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pareto front" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[proc.stderr.index("Traceback") - 500 :][:4000]
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
    again = patience.run(cli("report", str(run)), "the report", 120, capture_output=True, text=True,
                         env=env(shared_cache))  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert summary["best"]["trial"] in again.stdout.split("best:")[1]


def smoke_space(tmp_path: Path, name: str, iters: int, trials: int | None = None, **search) -> Path:
    """tiny_smoke with longer or shorter trials (and another trial count, other ``search`` keys), as a
    file named ``name``."""
    space = yaml.safe_load((ROOT / "search_spaces" / "tiny_smoke.yaml").read_text())
    space["method"]["ptq"]["recon.iters"] = iters
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


def test_campaign_killed_after_two_trials_resumes_without_rerunning(tmp_path, shared_cache, patience):
    path = smoke_space(tmp_path, "slow", iters=400)  # trials of seconds: the kill lands mid-campaign
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
    try:
        patience.wait_for(
            "two finished trials",
            lambda: len(_finished(run)) >= 2,
            240,
            alive=lambda: proc.poll() is None,
            progress=lambda: f"({len(_finished(run))} so far)",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    before = _finished(run)
    assert 2 <= len(before) < 5, "the kill must land after two finished trials and before the end"

    resumed = patience.run([*argv, "--resume"], "the resumed campaign", 300, capture_output=True, text=True,
                           env=env(shared_cache))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = pq.read_table(run / "results.parquet").to_pylist()
    assert len(rows) == 5 and len({r["trial"] for r in rows}) == 5
    assert all(r["status"] in ("complete", "stopped") for r in rows)
    after = _finished(run)
    for name, final in before.items():  # the same final report, or one replayed from the memo (no compute):
        # a trial killed between its final report and Tune's record of it is restarted, and replays
        same = after[name]["timestamp"] == final["timestamp"] and after[name]["score"] == final["score"]
        assert same or after[name].get("replayed") == 1.0, f"{name} was rerun"


def test_run_refuses_an_existing_named_campaign_without_resume(tmp_path, shared_cache, patience):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "campaign.json").write_text("{}")
    argv = cli("run", "--space", "tiny_smoke", "--storage", str(tmp_path), "--name", "mine")
    proc = patience.run(argv, "the refused run", 120, capture_output=True, text=True, env=env(shared_cache))
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "mine" / "campaign.json").read_text() == "{}"  # untouched


def test_campaign_on_a_uri_lives_there_and_resumes_and_reports_from_it(tmp_path, shared_cache, patience):
    """file:// stands in for s3://: Tune writes the trials to the URI, the driver its own files."""
    uri = f"file://{tmp_path}/bucket/campaigns"
    argv = cli("run", "--space", "tiny_smoke", "--storage", uri, "--num-cpus", "2", "--name", "remote")
    proc = patience.run(argv, "the URI campaign", 300, capture_output=True, text=True, env=env(shared_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"campaign stored at {uri}/remote" in proc.stdout
    remote = tmp_path / "bucket" / "campaigns" / "remote"
    for name in ("campaign.json", "sensitivity.json", "results.parquet", "pareto.png", "best_plan.yaml",
                 "best_model.pt", "summary.json"):  # fmt: skip
        assert (remote / name).is_file(), name
    finals = {p.parent.name: p.read_text() for p in remote.glob("trial_*/result.json")}
    assert len(finals) == 3

    elsewhere = env(tmp_path / "another-machine")  # an empty cache: no mirror, no samples
    rep = patience.run(cli("report", f"{uri}/remote"), "the URI report", 120, capture_output=True, text=True,
                       env=elsewhere)  # fmt: skip
    best = json.loads((remote / "summary.json").read_text())["best"]["trial"]
    assert rep.returncode == 0 and best in rep.stdout.split("best:")[1], rep.stderr[-2000:]
    changed = patience.run([*argv, "--resume", "--trials", "5"], "the refused resume", 120,
                           capture_output=True, text=True, env=elsewhere)  # fmt: skip
    assert changed.returncode == 2 and "search.trials: 3 -> 5" in changed.stderr
    again = patience.run(
        [*argv, "--resume"], "the URI resume", 300, capture_output=True, text=True, env=elsewhere
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.parent.name: p.read_text() for p in remote.glob("trial_*/result.json")} == finals


def _trial_starts(run: Path) -> dict[str, float]:
    """When Tune started each trial: the time it wrote the trial's params.json (a trial stopped by the
    budget before its first report has no result to tell it)."""
    return {f.parent.name.removeprefix("trial_"): f.stat().st_mtime for f in run.glob("trial_*/params.json")}


def test_time_budget_stops_starting_trials_and_keeps_the_best_so_far(tmp_path, shared_cache, patience):
    budget = round(patience(20))  # room for several trials of seconds, on this machine at its load
    path = smoke_space(tmp_path, "timed", iters=5, trials=500)
    argv = cli("run", "--space", str(path), "--storage", str(tmp_path), "--num-cpus", "2",
               "--time-budget", str(budget), "--name", "timed")  # fmt: skip
    proc = patience.run(argv, f"the {budget} s campaign", 600, capture_output=True, text=True,
                        env=env(shared_cache))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "timed" / "results.parquet").to_pylist()
    assert 1 <= len(rows) < 500  # it stopped starting trials long before the 500th
    assert json.loads((tmp_path / "timed" / "summary.json").read_text())["best"] is not None, proc.stdout
    starts = _trial_starts(tmp_path / "timed")
    # a trial still pending when the budget ran out is recorded, stopped, but never started
    unstarted = [r for r in rows if r["trial"] not in starts]
    assert all(r["status"] == "stopped" and r["reports"] == "[]" for r in unstarted), unstarted
    assert len(unstarted) < len(rows), "no trial started"
    # every trial began within the budget (a trial admitted at its end may be set up a little later
    # on a loaded machine)
    assert max(starts.values()) - min(starts.values()) <= budget + patience(5)


def test_refined_campaign_ships_the_best_mean_plan_and_never_reruns_twice(tmp_path, shared_cache, patience):
    path = smoke_space(tmp_path, "refined", iters=5, trials=4, refine_top=2, refine_seeds=1)
    argv = cli("run", "--space", str(path), "--storage", str(tmp_path), "--num-cpus", "2", "--name", "r")
    proc = patience.run(
        argv, "the refined campaign", 300, capture_output=True, text=True, env=env(shared_cache)
    )
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

    again = patience.run([*argv, "--resume"], "the refined resume", 300, capture_output=True, text=True,
                         env=env(shared_cache))  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "refining" not in again.stdout  # every rerun was kept: none runs again
    assert sorted((run / "refine").glob("*/model.pt")) == kept
    report = patience.run(cli("report", str(run)), "the refined report", 120, capture_output=True, text=True,
                          env=env(shared_cache))  # fmt: skip
    assert report.returncode == 0 and json.loads((run / "summary.json").read_text())["best"] == best


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
