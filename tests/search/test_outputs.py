"""What a finished campaign prints."""

from __future__ import annotations

from pathlib import Path

from dfq_search.search.outputs import CampaignResult, _print


def test_a_campaign_without_a_best_plan_says_why(tmp_path: Path) -> None:
    rows = [{"trial": "t1", "status": "stopped"}, {"trial": "t2", "status": "stopped"}]
    lines: list[str] = []
    _print(CampaignResult(tmp_path, rows, [], None), lines.append)
    text = "\n".join(lines)
    assert "2 trials: 0 complete, 2 stopped early" in text and "best:" not in text
    assert "no best plan: no trial reached its final report" in text and "--time-budget" in text
