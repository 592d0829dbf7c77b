"""Refinement: the finalists, their reruns (kept as they end, never run twice), and the best by mean."""

from __future__ import annotations

import json
from pathlib import Path

from dfq_search.fingerprint import config_hash
from dfq_search.search.refine import (
    REFINE_DIR,
    finalists,
    refine,
    refined_best,
    rerun_configs,
    reruns,
    with_reruns,
)
from dfq_search.search.results import best


def _row(tmp: Path, trial: str, score: float, size: float = 10.0, plan=None, status="complete"):
    ckpt = tmp / "trials" / trial
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "model.pt").write_bytes(trial.encode())
    return {"trial": trial, "status": status, "score": score, "size_kib": size, "agreement": 50.0,
            "plan": json.dumps(plan or {"layer": trial}), "checkpoint": str(ckpt)}  # fmt: skip


def _config(trial: str) -> dict:
    return {"plan": {"layer": trial}, "ptq.iters": 5, "seed": 0}


def _fake_run(scores: dict[tuple[str, int], float], calls: list):
    """A ``run`` that 'reconstructs' with the given score per (trial, seed), or fails where absent."""

    def run(configs, done):
        for i, c in enumerate(configs):
            calls.append(c)
            key = (c["plan"]["layer"], c["seed"])
            if key in scores:
                done(i, {"score": scores[key], "agreement": 60.0 + c["seed"]}, f"{key}".encode(), None)
            else:
                done(i, None, None, "RuntimeError: boom")

    return run


def test_finalists_are_the_best_distinct_plans(tmp_path):
    rows = [
        _row(tmp_path, "a", 80.0),
        _row(tmp_path, "b", 82.0),
        _row(tmp_path, "b2", 81.0, plan={"layer": "b"}),  # the same plan as b: counted once
        _row(tmp_path, "c", 79.0),
        _row(tmp_path, "s", 99.0, status="stopped"),  # never a finalist
    ]
    assert [r["trial"] for r in finalists(rows, 2)] == ["b", "a"]
    assert [r["trial"] for r in finalists(rows, 10)] == ["b", "a", "c"]
    assert finalists(rows, 0) == []


def test_reruns_use_the_next_seeds_and_are_kept_once(tmp_path):
    rows = [_row(tmp_path, "a", 80.0), _row(tmp_path, "b", 79.0), _row(tmp_path, "c", 70.0)]
    configs = {t: _config(t) for t in "abc"}
    jobs = rerun_configs(tmp_path, rows[:2], configs, seeds=2)
    assert [(t, c["seed"]) for t, c in jobs] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert all(c["ptq.iters"] == 5 for _, c in jobs)  # the same settings otherwise

    calls, log = [], []
    scores = {("a", 1): 81.0, ("a", 2): 79.0, ("b", 1): 83.0}  # b's seed 2 fails
    refine(tmp_path, rows[:2], configs, 2, _fake_run(scores, calls), log.append)
    assert len(calls) == 4 and any("failed" in line and "boom" in line for line in log)
    kept = sorted(p.parent.name for p in (tmp_path / REFINE_DIR).glob("*/model.pt"))
    assert kept == sorted(config_hash({**configs[t], "seed": s}) for t, s in scores)

    calls.clear()  # resumed: only the failed rerun runs again
    refine(tmp_path, rows[:2], configs, 2, _fake_run(scores, calls), log.append)
    assert [(c["plan"]["layer"], c["seed"]) for c in calls] == [("b", 2)]


def test_the_best_is_the_plan_with_the_best_mean_shipped_as_its_best_run(tmp_path):
    rows = [_row(tmp_path, "a", 82.0), _row(tmp_path, "b", 81.0), _row(tmp_path, "c", 70.0)]
    configs = {t: _config(t) for t in "abc"}
    assert refined_best(rows, reruns(tmp_path), 2)["trial"] == "a"  # nothing rerun: the plain best
    assert refined_best(rows, reruns(tmp_path), 2) == best(rows)
    # a was lucky (82, then 78 and 79: mean 79.67); b is steady (81, 80, 81.5: mean 80.83)
    scores = {("a", 1): 78.0, ("a", 2): 79.0, ("b", 1): 80.0, ("b", 2): 81.5}
    refine(tmp_path, rows, configs, 2, _fake_run(scores, []), lambda line: None)  # c: no reruns (fails)
    top = refined_best(rows, reruns(tmp_path), 2)
    assert top["trial"] == "b" and top["refined_runs"] == 3
    assert abs(top["refined_mean"] - (81.0 + 80.0 + 81.5) / 3) < 1e-9
    assert top["score"] == 81.5 and top["refined_seed"] == 2 and top["agreement"] == 62.0  # its best run
    assert (Path(top["checkpoint"]) / "model.pt").read_bytes() == b"('b', 2)"
    assert json.loads(top["refined_scores"]) == [81.0, 80.0, 81.5]


def test_the_trials_own_run_is_shipped_when_it_scored_best(tmp_path):
    rows = [_row(tmp_path, "a", 82.0), _row(tmp_path, "b", 70.0)]
    refine(tmp_path, rows[:1], {t: _config(t) for t in "ab"}, 1, _fake_run({("a", 1): 81.0}, []), print)
    top = refined_best(rows, reruns(tmp_path), 1)
    assert top["trial"] == "a" and top["score"] == 82.0 and top["refined_seed"] is None
    assert top["checkpoint"] == rows[0]["checkpoint"]


def test_a_rerun_warm_start_is_never_the_best_unless_a_finalist(tmp_path):
    rows = [_row(tmp_path, "a", 82.0), _row(tmp_path, "b", 81.0), _row(tmp_path, "u", 70.0)]
    configs = {t: _config(t) for t in "abu"}
    scores = {("a", 1): 80.0, ("u", 1): 99.0}  # the uniform plan, rerun for the comparison, got lucky
    refine(tmp_path, [rows[0], rows[2]], configs, 1, _fake_run(scores, []), lambda line: None)
    assert refined_best(rows, reruns(tmp_path), 2)["trial"] == "a"
    marked = with_reruns(rows[2], reruns(tmp_path))
    assert marked["refined_mean"] == (70.0 + 99.0) / 2 and marked["score"] == 99.0
    assert with_reruns(rows[1], reruns(tmp_path)) == rows[1]  # nothing rerun: unchanged


def test_no_refinement_when_the_reruns_would_overrun_the_time_left(tmp_path):
    rows = [{**_row(tmp_path, "a", 82.0), "seconds": 30.0}]
    calls, log = [], []
    run = _fake_run({("a", 1): 80.0, ("a", 2): 80.0}, calls)
    refine(tmp_path, rows, {"a": _config("a")}, 2, run, log.append, time_left=50.0, concurrency=1)
    assert calls == [] and "not refining" in log[-1]  # 2 reruns of 30 s, one at a time: 60 s > 50 s
    refine(tmp_path, rows, {"a": _config("a")}, 2, run, log.append, time_left=50.0, concurrency=2)
    assert len(calls) == 2  # two at a time: 30 s


def _screen_config(trial: str) -> dict:
    return {"plan": {"layer": trial}, "ptq.recon.iters": 50, "seed": 0}


def test_screened_trials_are_rerun_at_refine_iters_and_judged_by_those_runs_alone(tmp_path):
    """A screen at 50 steps: the finalists rerun at 200, and their means and shipped models are the
    200-step runs' only (the screening score, whatever it was, counts for nothing)."""
    rows = [_row(tmp_path, "a", 90.0), _row(tmp_path, "b", 80.0)]  # a: a lucky screen
    configs = {t: _screen_config(t) for t in "ab"}
    calls = []
    scores = {("a", 1): 70.0, ("a", 2): 72.0, ("b", 1): 81.0, ("b", 2): 83.0}
    refine(tmp_path, rows, configs, 2, _fake_run(scores, calls), lambda line: None, iters=200)
    assert [c["ptq.recon.iters"] for c in calls] == [200] * 4 and all(c["screened"] for c in calls)
    top = refined_best(rows, reruns(tmp_path), 2)
    assert top["trial"] == "b" and top["refined_mean"] == 82.0 and top["refined_runs"] == 2
    assert top["score"] == 83.0 and top["refined_seed"] == 2 and top["refined_screened"]
    a = with_reruns(rows[0], reruns(tmp_path))
    assert a["refined_mean"] == 71.0 and a["score"] == 72.0  # not 90: the screen is left out
    again = []  # kept: a second refine runs nothing
    refine(tmp_path, rows, configs, 2, _fake_run(scores, again), lambda line: None, iters=200)
    assert again == []


def test_refine_iters_equal_to_the_trials_is_plain_refinement(tmp_path):
    rows = [_row(tmp_path, "a", 82.0)]
    calls = []
    refine(tmp_path, rows, {"a": _screen_config("a")}, 1, _fake_run({("a", 1): 80.0}, calls), print, iters=50)
    assert "screened" not in calls[0] and calls[0]["ptq.recon.iters"] == 50
    top = with_reruns(rows[0], reruns(tmp_path))
    assert top["refined_mean"] == 81.0 and not top["refined_screened"]


def test_a_screen_time_estimate_scales_with_the_longer_reruns(tmp_path):
    rows = [{**_row(tmp_path, "a", 82.0), "seconds": 10.0}]
    calls, log = [], []
    run = _fake_run({("a", 1): 80.0}, calls)
    refine(tmp_path, rows, {"a": _screen_config("a")}, 1, run, log.append, time_left=30.0, iters=200)
    assert calls == [] and "not refining" in log[-1]  # 4x the steps: about 40 s > 30 s


def test_a_screened_mean_leaves_out_reruns_kept_from_a_plain_refinement(tmp_path):
    rows = [_row(tmp_path, "a", 90.0)]
    configs = {"a": _screen_config("a")}
    refine(tmp_path, rows, configs, 1, _fake_run({("a", 1): 60.0}, []), print)  # at the trial's 50 steps
    refine(tmp_path, rows, configs, 1, _fake_run({("a", 1): 80.0}, []), print, iters=200)  # resumed
    top = with_reruns(rows[0], reruns(tmp_path))
    assert top["refined_screened"] and top["refined_mean"] == 80.0 and top["refined_runs"] == 1
