"""What a finished campaign prints."""

from __future__ import annotations

from pathlib import Path

from dfq_search.search.outputs import CampaignResult, _print, verdict


def test_a_campaign_without_a_best_plan_says_why(tmp_path: Path) -> None:
    rows = [{"trial": "t1", "status": "stopped"}, {"trial": "t2", "status": "stopped"}]
    lines: list[str] = []
    _print(CampaignResult(tmp_path, rows, [], None), lines.append, {})
    text = "\n".join(lines)
    assert "2 trials: 0 complete, 2 stopped early" in text and "best:" not in text
    assert "no best plan: no trial reached its final report" in text and "--time-budget" in text


def _row(trial: str, score: float, size: float, **extra) -> dict:
    return {
        "trial": trial,
        "status": "complete",
        "kind": "ptq",
        "score": score,
        "agreement": 90.0,
        "kl": 0.1,
        "size_kib": size,
        "mean_weight_bits": size / 3,
        "mbops": 1.0,
        "seconds": 1.0,
        **extra,
    }


def test_the_output_names_the_score_and_says_which_run_the_best_row_is(tmp_path: Path) -> None:
    best = _row("b1", -0.70, 7.13, refined_mean=-0.71, refined_runs=3, refined_seed=2, test_top1=98.33)
    uniform = _row("u1", -0.98, 8.82, refined_mean=-0.98, refined_runs=3, test_top1=97.78)
    smaller = _row("u2", -3.5, 5.9, refined_mean=-3.4, refined_runs=3, test_top1=80.0)  # also fits
    marks = {"uniform-w2/4": smaller, "uniform-w3/4": uniform}  # the larger is the reference
    result = CampaignResult(tmp_path, [best, uniform, smaller], [best], best, marks=marks)
    lines: list[str] = []
    meta = {"objective": "mse", "test_data": "digits test split"}
    _print(result, lines.append, meta)
    text = "\n".join(lines)
    assert "score: -MSE of the logits to the full-precision model on held-out samples" in text
    assert "mean score over 3 runs" in text and "rerun with reconstruction seed 2" in text
    said = verdict(result, meta)
    assert said in text and "-0.71 against -0.98 for the uniform plan" in said
    assert "top-1 98.33 against 97.78 (+0.55)" in said and "digits test split" in said
    assert verdict(CampaignResult(tmp_path, [best], [best], best), meta) is None  # no uniform to compare
