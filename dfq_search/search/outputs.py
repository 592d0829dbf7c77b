"""What a campaign leaves behind: results.parquet, the Pareto front (table and PNG), the best plan and
model (checkpoint, ONNX), summary.json; the candidates scored on test images when there are some.
``finalize`` rebuilds all of it from the campaign folder (``dfq-search report``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfq_search.errors import DfqError
from dfq_search.models import ModelBundle
from dfq_search.quant import LayerBits
from dfq_search.search.objective import score_name
from dfq_search.search.refine import refined_best, reruns, with_reruns
from dfq_search.search.results import (
    candidates,
    front_table,
    pareto_front,
    plot_front,
    result_rows,
    write_parquet,
)
from dfq_search.search.runner import TrialRecord, print_line

Log = Callable[[str], None]


@dataclass
class CampaignResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    best: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)
    marks: dict[str, dict[str, Any]] = field(default_factory=dict)


def score_on_test(rows: list[dict[str, Any]], test, bundle: ModelBundle) -> None:
    from dfq_search.checkpoint import load_quantized
    from dfq_search.evaluate import Evaluator

    device = next(bundle.model.parameters()).device
    ev = Evaluator(test, bundle.preprocess, reference=bundle.model, device=device)
    fp = ev(bundle.model).top1
    for r in rows:
        q, _ = load_quantized(Path(r["checkpoint"]) / "model.pt", device)
        r["test_top1"] = ev(q).top1
        r["test_drop"] = fp - r["test_top1"]


def mark_rows(rows: list[dict[str, Any]], starts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The complete trial of each warm-start plan, by name (plans that coincide: names joined by =)."""
    by_plan: dict[str, str] = {}
    for name, bits in starts.items():
        plan = json.dumps({n: {"w": b.w, "a": b.a} for n, b in bits.items()})
        by_plan[plan] = f"{by_plan[plan]} = {name}" if plan in by_plan else name
    out = {}
    for r in candidates(rows):
        name = by_plan.get(r["plan"])
        if name and name not in out:
            out[name] = r
    return out


def finalize(
    run_dir: Path,
    prep: Any,
    records: list[TrialRecord],
    log: Log = print_line,
    extra: dict[str, Any] | None = None,
    fetch: Callable[[Path], None] | None = None,
) -> CampaignResult:
    """Rows, front, best and every output file of the campaign in ``run_dir`` from its trials'
    ``records`` (its runner's); ``fetch(folder)`` brings a checkpoint folder that is not local yet (a
    campaign on a URI) before it is read."""
    meta = json.loads((run_dir / "campaign.json").read_text())
    rows = result_rows(records, int(meta.get("reports", 1)))
    front, again = pareto_front(rows), reruns(run_dir)
    top = refined_best(rows, again, int(meta.get("search", {}).get("refine_top", 0)))
    starts = (
        prep.starts
        if prep is not None
        else {k: {n: LayerBits(**b) for n, b in v.items()} for k, v in meta.get("warm_starts", {}).items()}
    )
    plain = mark_rows(rows, starts)
    marks = {name: with_reruns(r, again) for name, r in plain.items()}  # rerun with the finalists
    shown = {id(r): r for r in [*front, *marks.values(), *([top] if top else [])]}  # refined: copies
    if fetch is not None:
        for r in shown.values():
            if r.get("checkpoint"):
                fetch(Path(r["checkpoint"]))
    if prep is not None and prep.test_data is not None and shown:
        score_on_test(list(shown.values()), prep.test_data, prep.bundle)
    files = {"results": str(write_parquet(rows, run_dir / "results.parquet"))}
    files["pareto_plot"] = str(
        plot_front(rows, front, run_dir / "pareto.png", plain, f"score: {score_name(meta.get('objective'))}")
    )
    result = CampaignResult(run_dir, rows, front, top, files, marks)
    if top is not None:
        _write_best(result, prep)
    summary = {**_summary(result), "verdict": verdict(result, meta), **(extra or {})}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    files["summary"] = str(run_dir / "summary.json")
    _print(result, log, meta)
    return result


def verdict(result: CampaignResult, meta: dict[str, Any]) -> str | None:
    """One sentence: what the best plan gained over the uniform warm start (the largest uniform plan
    that fits the budget, when several do), and on which images."""
    top = result.best
    uniforms = [r for name, r in result.marks.items() if name.startswith("uniform")]
    uniform = max(uniforms, key=lambda r: r["size_kib"], default=None)
    if top is None or uniform is None:
        return None
    metric = meta.get("objective", "score")
    mean = lambda r: r.get("refined_mean", r["score"])  # noqa: E731
    text = (f"The best plan ({top['size_kib']:.2f} KiB, {top['mean_weight_bits']:.2f} mean weight bits) "
            f"scores {mean(top):.4g} against {mean(uniform):.4g} for the uniform plan "
            f"({uniform['size_kib']:.2f} KiB; score: {score_name(metric)}")  # fmt: skip
    text += f", mean of {top['refined_runs']} runs)" if top.get("refined_runs") else ")"
    if top.get("test_top1") is not None and uniform.get("test_top1") is not None:
        gain = top["test_top1"] - uniform["test_top1"]
        text += (f"; on the test images ({meta.get('test_data')}) its shipped model has top-1 "
                 f"{top['test_top1']:.2f} against {uniform['test_top1']:.2f} ({gain:+.2f})")  # fmt: skip
    return text + "."


def _write_best(result: CampaignResult, prep: Any) -> None:
    import yaml

    top, run_dir = result.best, result.run_dir
    plan_path = run_dir / "best_plan.yaml"
    plan_path.write_text(yaml.safe_dump(json.loads(top["plan"]), sort_keys=False))
    model_path = run_dir / "best_model.pt"
    shutil.copyfile(Path(top["checkpoint"]) / "model.pt", model_path)
    result.files |= {"best_plan": str(plan_path), "best_model": str(model_path)}
    try:
        from dfq_search.checkpoint import load_quantized
        from dfq_search.export import export_onnx

        q, meta = load_quantized(model_path)
        result.files["best_onnx"] = str(
            export_onnx(q, meta["preprocess"].example_input(), run_dir / "best_model.onnx")
        )
    except (DfqError, ImportError) as err:
        result.files["best_onnx"] = f"not written: {err}"


def _which_run(best: dict[str, Any]) -> str:
    """Which run of its plan the best row shows (the Pareto table shows every trial's own run)."""
    if not best.get("refined_runs"):
        return f"(trial {best['trial']}'s own run; the shipped model)"
    seed = best.get("refined_seed")
    run = "the trial's own run" if seed is None else f"its rerun with reconstruction seed {seed}"
    return (f"(plan of trial {best['trial']}: refined_mean is its mean score over {best['refined_runs']} "
            f"runs; the other columns and the shipped model are {run}, the one that scored highest; "
            "the Pareto table shows each trial's own run)")  # fmt: skip


def _summary(result: CampaignResult) -> dict[str, Any]:
    counts = {
        s: sum(r["status"] == s for r in result.rows) for s in ("complete", "stopped", "infeasible", "failed")
    }
    return {
        "trials": len(result.rows),
        **counts,
        "replayed": sum(bool(r.get("replayed")) for r in result.rows),
        "best": result.best,
        "front": result.front,
        "warm_starts": result.marks,
        "files": result.files,
    }


def _print(result: CampaignResult, log: Log, meta: dict[str, Any]) -> None:
    counts = _summary(result)
    log(
        f"\n{counts['trials']} trials: {counts['complete']} complete, {counts['stopped']} stopped early, "
        f"{counts['infeasible']} over budget, {counts['failed']} failed"
        + (f"; {counts['replayed']} repeated a finished trial's config (replayed, no compute)"
           if counts["replayed"] else "")
    )  # fmt: skip
    extra = ("test_top1", "test_drop")
    refined = ("refined_mean", "refined_runs")  # when the best and the warm starts were rerun
    if result.front:
        log("Pareto front (score vs weight size):\n" + front_table(result.front, extra))
    if result.marks:
        named = [{**r, "trial": f"{name} ({r['trial']})"} for name, r in result.marks.items()]
        log("warm starts:\n" + front_table(named, (*extra, *refined)))
    if result.best is not None:
        log("best:\n" + front_table([result.best], (*extra, *refined)))
        log(_which_run(result.best))
    else:
        log(
            "no best plan: no trial reached its final report (a --time-budget too short for one trial, or "
            "every trial failed or stopped early); the reports it did make are in results.parquet"
        )
    log(f"score: {score_name(meta.get('objective', 'score'))}; higher is better.")
    if (text := verdict(result, meta)) is not None:
        log(text)
    log(
        "files:\n"
        + "\n".join(f"  {k}: {v}" for k, v in result.files.items())
        + f"\n  tensorboard: {result.run_dir / 'tensorboard'}"
    )
