"""Results: rows from Tune's results, the Pareto front, the best trial, and the Parquet file."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from dfq_search.search.results import best, dominates, front_table, pareto_front, result_rows, write_parquet
from dfq_search.search.runner import TrialRecord


def _row(trial, score, size, status="complete", plan=None, checkpoint="ckpt", **extra):
    return {
        "trial": trial,
        "status": status,
        "score": score,
        "size_kib": size,
        "plan": json.dumps(plan or {"layer": trial}),
        "checkpoint": None if checkpoint is None else f"/runs/{trial}/{checkpoint}",
        "error": None,
        **extra,
    }


def test_dominance():
    assert dominates(_row("a", 90, 5), _row("b", 80, 6))
    assert dominates(_row("a", 90, 5), _row("b", 90, 6))
    assert dominates(_row("a", 90, 5), _row("b", 80, 5))
    assert not dominates(_row("a", 90, 5), _row("b", 90, 5))  # equal: neither
    assert not dominates(_row("a", 90, 6), _row("b", 80, 5))


def test_pareto_front():
    rows = [
        _row("big", 90.0, 10.0),
        _row("small", 80.0, 5.0, plan={"p": "small"}),
        _row("small-again", 82.0, 5.0, plan={"p": "small"}),  # the same plan, scored better: stands for it
        _row("small-worse", 79.0, 5.0, plan={"p": "small"}),
        _row("dominated", 85.0, 12.0),
        _row("tie-a", 70.0, 3.0),
        _row("tie-b", 70.0, 3.0),  # another plan, equal in both: neither dominates
        _row("stopped", 99.0, 1.0, status="stopped"),
        _row("failed", 99.0, 1.0, status="failed"),
        _row("infeasible", 99.0, 1.0, status="infeasible"),
        _row("no-checkpoint", 99.0, 1.0, checkpoint=None),
        _row("no-score", None, 1.0),
    ]
    front = pareto_front(rows)
    assert [r["trial"] for r in front] == ["tie-a", "tie-b", "small-again", "big"]
    assert pareto_front([]) == []
    assert pareto_front(rows[7:]) == []
    table = front_table(front)
    assert "small-again" in table and "dominated" not in table


def test_best():
    rows = [
        _row("a", 80.0, 5.0),
        _row("b", 90.0, 7.0),
        _row("c", 90.0, 6.0),
        _row("d", 99.0, 1.0, status="stopped"),
    ]
    assert best(rows)["trial"] == "c"  # ties: the smaller
    assert best([_row("x", 99.0, 1.0, status="failed")]) is None
    assert best([]) is None


def test_parquet_round_trip(tmp_path):
    rows = [
        _row("a", 80.5, 5.0, kl=0.25, reports=json.dumps([70.0, 80.5])),
        {
            **_row("b", None, 6.0, status="failed", checkpoint=None, kl=None, reports="[]"),
            "error": "TrialFailed: the objective is not finite (nan) at report 1",
        },
        _row("c", -1000.0, 9.0, status="infeasible", kl=None, reports="[]", test_top1=97.5),
    ]
    path = write_parquet(rows, tmp_path / "out" / "results.parquet")
    assert path == tmp_path / "out" / "results.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["results.parquet"]  # written atomically
    back = pq.read_table(path).to_pylist()
    assert back[1]["error"] == "TrialFailed: the objective is not finite (nan) at report 1"
    assert back[1]["score"] is None
    # a column only some rows have (test scores of the shown trials) is kept, None elsewhere
    assert [r["test_top1"] for r in back] == [None, None, 97.5]
    assert back == [{**r, "test_top1": r.get("test_top1")} for r in rows]


class _Checkpoint:
    def __init__(self, path):
        self.path = path


def _result(trial_id, metrics, config, scores=(), error=None, checkpoint=None):
    """A trial as its runner records it (plain values: dfq_search.distributed.runner.records_of)."""
    return TrialRecord(
        trial=trial_id,
        metrics={"trial_id": trial_id, **metrics},
        config=config,
        scores=list(scores),
        error=None if error is None else str(error),
        checkpoint=checkpoint,
        path=f"/runs/c/{trial_id}",
    )


def test_result_rows_from_tune_results():
    plan = {"stem.0": {"w": 8, "a": 8}}
    config = {
        "kind": "ptq",
        "ptq.iters": 5,
        "plan": plan,
        "cost": {"size_kib": 2.5, "mbops": 9.0},
        "feasible": True,
    }
    grid = [
        _result(
            "t2",
            {"score": -0.2, "fidelity": 3, "seconds": 1.5, "guard_kept": "rtn"},
            config,
            [-0.5, -0.3, -0.2],
            checkpoint="/ck",
        ),
        _result("t1", {"score": -0.4, "fidelity": 2}, config, [-0.5, -0.4]),
        _result(
            "t3", {"score": float("nan"), "fidelity": 1}, config, [float("nan")], error=ValueError("bad\n x")
        ),
        _result("t4", {"score": -1e3, "fidelity": 3, "feasible": False}, {**config, "feasible": False}),
    ]
    rows = result_rows(grid, reports=3)
    assert [r["trial"] for r in rows] == ["t1", "t2", "t3", "t4"]
    assert [r["status"] for r in rows] == ["stopped", "complete", "failed", "infeasible"]
    t2 = rows[1]
    assert t2["checkpoint"] == "/ck" and t2["size_kib"] == 2.5 and t2["kind"] == "ptq"
    assert json.loads(t2["reports"]) == [-0.5, -0.3, -0.2]
    assert json.loads(t2["plan"]) == plan
    assert json.loads(t2["params"]) == {"kind": "ptq", "ptq.iters": 5}
    assert t2["mean_weight_bits"] is None
    assert t2["guard_kept"] == "rtn" and rows[0]["guard_kept"] is None  # PTQ's guard, when it ran
    t3 = rows[2]
    assert t3["score"] is None and json.loads(t3["reports"]) == [None]  # NaN is stored as null
    assert t3["error"] == "x"  # the last line of the error: the exception line of a remote traceback
    assert not any(isinstance(v, float) and math.isnan(v) for r in rows for v in r.values())
    assert [r["trial"] for r in pareto_front(rows)] == ["t2"]


def test_result_rows_tolerate_missing_metrics():
    [row] = result_rows([TrialRecord("t9", {}, {}, path="/runs/c/t9")], reports=2)
    assert row["trial"] == "t9" and row["status"] == "stopped" and row["score"] is None


@pytest.mark.parametrize("reports", [1, 3])
def test_a_trial_is_complete_at_the_last_report(reports):
    full = _result("a", {"score": 1.0, "fidelity": reports}, {})
    short = _result("b", {"score": 1.0, "fidelity": reports - 1}, {})
    assert [r["status"] for r in result_rows([full, short], reports)] == ["complete", "stopped"]
