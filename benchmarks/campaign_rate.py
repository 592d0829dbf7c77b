"""Trials per hour of finished campaigns, from Ray Tune's own records (each trial folder's
``result.json``): the search's span (first trial start to last trial end, refinement excluded), the
trials' seconds summed (a trial holds one CPU, so these are its CPU-seconds) and the rates they give.

    python benchmarks/campaign_rate.py runs/bench/cifar_resnet20-w3-tpe-s0-XXXX [--base OLD_CAMPAIGN]

With ``--base``, the ratios of each campaign's rates to the base campaign's. Works on campaigns of any
commit (it reads Tune's files, not the project's). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("campaigns", nargs="+", type=Path, help="campaign folders (a Tune experiment each)")
    p.add_argument("--base", type=Path, default=None, help="the campaign the others are compared with")
    return p.parse_args()


def trial_times(result_json: Path) -> tuple[float, float, float, int] | None:
    """(start, end, seconds, reports) of one trial from its Tune result lines, None if it never reported."""
    lines = [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    first, last = lines[0], lines[-1]
    start = first["timestamp"] - first.get("time_this_iter_s", 0.0)
    return start, float(last["timestamp"]), float(last["time_total_s"]), len(lines)


def rate(campaign: Path) -> dict:
    """The campaign's trials, span and CPU-seconds, and the trials per hour they give."""
    if not campaign.is_dir():
        sys.exit(f"campaign folder {campaign} does not exist: pass a folder a campaign wrote its trials to")
    times = [t for f in sorted(campaign.glob("trial_*/result.json")) if (t := trial_times(f)) is not None]
    if not times:
        sys.exit(f"{campaign} holds no trial results (trial_*/result.json): is it a campaign folder?")
    span = max(t[1] for t in times) - min(t[0] for t in times)
    cpu = sum(t[2] for t in times)
    return {"campaign": campaign.name, "trials": len(times), "span_s": round(span, 1),
            "trial_cpu_s": round(cpu, 1), "trials_per_hour": round(3600 * len(times) / span, 1),
            "trials_per_cpu_hour": round(3600 * len(times) / cpu, 1)}  # fmt: skip


def main() -> None:
    args = parse_args()
    rows = [rate(c) for c in args.campaigns]
    base = rate(args.base) if args.base else None
    for row in rows:
        if base is not None:
            row["x_per_hour"] = round(row["trials_per_hour"] / base["trials_per_hour"], 2)
            row["x_per_cpu_hour"] = round(row["trials_per_cpu_hour"] / base["trials_per_cpu_hour"], 2)
        print(row)
    emit({"base": base, "rows": rows})


if __name__ == "__main__":
    main()
