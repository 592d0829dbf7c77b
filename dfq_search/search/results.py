"""A campaign's results as rows (one per trial), the Pareto front, and the files they are written to.

Rows come from the runner's plain records of the trials (:class:`.runner.TrialRecord`, read from the
campaign's folder), so they can be rebuilt from a finished, interrupted or still running campaign
(``dfq-search report <dir>``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfq_search.cache import atomic_write
from dfq_search.report import format_table
from dfq_search.search.runner import TrialRecord

STATUSES = ("complete", "stopped", "infeasible", "failed")
TABLE = (
    "trial",
    "status",
    "kind",
    "score",
    "agreement",
    "top1",
    "kl",
    "size_kib",
    "mean_weight_bits",
    "mbops",
    "seconds",
)


def _status(metrics: dict[str, Any], error: Any, reports: int) -> str:
    if error is not None:
        return "failed"
    if not metrics.get("feasible", True):
        return "infeasible"
    return "complete" if metrics.get("fidelity", 0) >= reports else "stopped"


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def failure_reason(error: Any) -> str | None:
    """The exception line of a failed trial's error (Ray wraps it in a remote traceback)."""
    if error is None:
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:1000] if lines else type(error).__name__


def result_rows(records: Sequence[TrialRecord], reports: int) -> list[dict[str, Any]]:
    """One row per trial: parameters, final metrics, every report, status, timings, the failure reason
    and the checkpoint folder."""
    rows = []
    for result in records:
        m, config = result.metrics, result.config
        history = [_plain(float(v)) for v in result.scores]
        row: dict[str, Any] = {
            "trial": result.trial,
            "status": _status(m, result.error, reports),
            "kind": config.get("kind"),
            "score": _plain(m.get("score")),
            **{k: _plain(m.get(k)) for k in ("agreement", "top1", "kl", "mse", "oscillation", "fidelity")},
            **{k: _plain(config.get("cost", {}).get(k)) for k in ("size_kib", "mean_weight_bits", "mbops")},
            "seconds": _plain(m.get("seconds")),
            "wall_s": _plain(m.get("time_total_s")),
            "replayed": bool(m.get("replayed")),  # a repeated config, replayed from an earlier trial
            "guard_kept": m.get("guard_kept"),  # PTQ's guard: "reconstructed" or "rtn" (None: not run)
            "reused_units": _plain(m.get("reused_units")),  # groups loaded from earlier trials' (PTQ)
            "reports": json.dumps(history),
            "plan": json.dumps(config.get("plan", {})),
            "params": json.dumps({k: v for k, v in config.items() if k not in ("plan", "cost", "feasible")}),
            "error": failure_reason(result.error),
            "retries": result.retries,
            "node": m.get("node"),  # the node of the last report
            "checkpoint": result.checkpoint,
            "path": result.path,
        }
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` is at least as good in score and size, and better in one."""
    return (
        a["score"] >= b["score"]
        and a["size_kib"] <= b["size_kib"]
        and (a["score"] > b["score"] or a["size_kib"] < b["size_kib"])
    )


def candidates(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that ran to full fidelity within the budget (the only ones a front or a best may use)."""
    return [r for r in rows if r["status"] == "complete" and r["score"] is not None and r["checkpoint"]]


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The complete trials no other complete trial dominates, smallest first; of trials with the same
    plan, the best-scoring one stands for it."""
    by_plan: dict[str, dict[str, Any]] = {}
    for r in candidates(rows):
        if r["plan"] not in by_plan or r["score"] > by_plan[r["plan"]]["score"]:
            by_plan[r["plan"]] = r
    done = list(by_plan.values())
    front = [r for r in done if not any(dominates(o, r) for o in done if o is not r)]
    return sorted(front, key=lambda r: (r["size_kib"], -r["score"]))


def best(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest-scoring complete trial (ties: the smaller)."""
    done = candidates(rows)
    return max(done, key=lambda r: (r["score"], -r["size_kib"])) if done else None


def write_parquet(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``rows`` as a Parquet table, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist keeps the first row's only
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def front_table(front: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    cols = [c for c in (*TABLE, *extra) if any(r.get(c) is not None for r in front)]
    return format_table(front, cols)


def plot_front(
    rows: Sequence[dict[str, Any]],
    front: Sequence[dict[str, Any]],
    path: Path,
    marks: dict[str, dict[str, Any]] | None = None,
    ylabel: str = "score",
) -> Path:
    """Score against size for every complete trial, the front as a line, named points (e.g. the warm
    starts) labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = candidates(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["size_kib"] for r in done], [r["score"] for r in done], s=14, c="0.6", label="trials")
    ax.plot([r["size_kib"] for r in front], [r["score"] for r in front], "o-", c="C0", label="Pareto front")
    for name, r in (marks or {}).items():
        ax.annotate(name, (r["size_kib"], r["score"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("weight size (KiB)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
