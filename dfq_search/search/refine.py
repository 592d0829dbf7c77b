"""The campaign's finalists, re-run with other reconstruction seeds before the best is named.

A plan's score is one draw: its reconstruction's seed moves top-1 by 0.3-0.5 points on ResNet-20
(``benchmarks/plan_seeds.py``), as much as the plans of a campaign's top differ, so the highest single
score is partly luck (the winner's curse). The ``search.refine_top`` best complete plans, and the warm
starts (so the summary compares the best with the uniform plan on equal terms), are each run
``search.refine_seeds`` more times (seeds ``seed + 1 ...``; same settings); the best plan is the
finalist with the highest mean score, and the model shipped is its run that scored highest on the
objective.
With ``search.refine_iters`` above the trials' steps per unit, the trials are a cheap screen: the
finalists and warm starts are rerun at ``refine_iters`` and their means (and the model shipped) come
from those reruns alone, never from the screening run.
Every rerun is kept in ``<campaign>/refine/<config hash>/`` (metrics.json, model.pt) as it ends, so a
resumed campaign, or ``dfq-search report``, finds them without running them again.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dfq_search.fingerprint import config_hash
from dfq_search.search.results import best, candidates
from dfq_search.search.runner import print_line
from dfq_search.search.trial import Memo

REFINE_DIR = "refine"
ITERS = "ptq.recon.iters"  # the trial config's reconstruction steps per unit
SCREENED = "screened"  # a rerun at other steps than its trial's: the trial's own score was a screen
Log = Callable[[str], None]


def finalists(rows: Sequence[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The ``top`` best complete trials, one per plan (ties: the smaller)."""
    out, seen = [], set()
    for r in sorted(candidates(rows), key=lambda r: (-r["score"], r["size_kib"])):
        if r["plan"] not in seen and len(out) < top:
            seen.add(r["plan"])
            out.append(r)
    return out


def rerun_configs(
    run_dir: Path,
    targets: Sequence[dict[str, Any]],
    configs: dict[str, dict],
    seeds: int,
    iters: int | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(trial, config) of every rerun of the ``targets`` (trial rows) not yet kept in the refine folder;
    ``iters``: the reruns' reconstruction steps per unit (None: the trial's own)."""
    jobs = []
    for r in targets:
        config = configs.get(r["trial"])
        if config is None:
            continue
        for i in range(1, seeds + 1):
            again = {**config, "seed": int(config.get("seed", 0)) + i}
            if iters is not None and int(config.get(ITERS, iters)) != iters:
                again |= {ITERS: iters, SCREENED: True}
            if not (run_dir / REFINE_DIR / config_hash(again) / "metrics.json").is_file():
                jobs.append((r["trial"], again))
    return jobs


def refine(
    run_dir: Path,
    targets: Sequence[dict[str, Any]],
    configs: dict[str, dict],
    seeds: int,
    run: Callable,
    log: Log = print_line,
    time_left: float | None = None,
    concurrency: int = 1,
    iters: int | None = None,
) -> None:
    """Run the missing reruns of ``targets`` through ``run(configs, done)`` (the Ray side) and keep each
    as it ends; none when they would not fit in ``time_left`` seconds (estimated from the targets' own
    trial times, scaled by the reruns' ``iters`` over the trials', ``concurrency`` at a time)."""
    jobs = rerun_configs(run_dir, targets, configs, seeds, iters)
    if not jobs:
        return
    scale = max((j[ITERS] / configs[t].get(ITERS, j[ITERS]) for t, j in jobs if ITERS in j), default=1.0)
    longest = max((r.get("seconds") or 0.0 for r in targets), default=0.0) * max(scale, 1.0)
    needed = math.ceil(len(jobs) / max(1, concurrency)) * longest
    if time_left is not None and needed > time_left:
        log(f"not refining: {len(jobs)} reruns need about {needed:.0f} s, {max(time_left, 0):.0f} s of the "
            "time budget are left")  # fmt: skip
        return
    screen = any(SCREENED in c for _, c in jobs)
    steps = f" at {iters} steps per unit (the trials were a screen)" if screen else ""
    log(f"refining {len(targets)} plans (the best and the warm starts): {len(jobs)} reruns with other "
        f"reconstruction seeds{steps} ...")  # fmt: skip

    def done(i: int, metrics: dict | None, blob: bytes | None, error: str | None) -> None:
        trial, config = jobs[i]
        if metrics is None or blob is None:
            log(f"  rerun {i + 1}/{len(jobs)} of trial {trial} (seed {config['seed']}) failed: {error}")
            return
        seed, memo = config["seed"], Memo(str(run_dir / REFINE_DIR), config)
        with tempfile.TemporaryDirectory(prefix="dfq_rerun_") as folder:
            (Path(folder) / "model.pt").write_bytes(blob)
            memo.save({**metrics, "trial": trial, "seed": seed, SCREENED: bool(config.get(SCREENED))},
                      Path(folder))  # fmt: skip
        log(f"  rerun {i + 1}/{len(jobs)} of trial {trial} (seed {seed}): score {metrics['score']:.4f}")

    run([c for _, c in jobs], done)


def reruns(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The kept reruns by the trial they repeat (metrics, with ``checkpoint``: their folder)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((run_dir / REFINE_DIR).glob("*/metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (path.parent / "model.pt").is_file() and "trial" in m:
            out.setdefault(m["trial"], []).append({**m, "checkpoint": str(path.parent)})
    return out


def with_reruns(row: dict[str, Any], again: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``row`` with the mean score over its runs (``refined_*``), shipped as its best-scoring run. A
    trial whose reruns reconstructed at other steps (``search.refine_iters``) was a screen: the mean and
    the shipped run are its reruns' alone."""
    kept = again.get(row["trial"], [])
    screened = any(r.get(SCREENED) for r in kept)
    if screened:  # reruns kept from a refinement at the trial's own steps (before a resume) do not count
        kept = [r for r in kept if r.get(SCREENED)]
    runs = [*([] if screened else [{**row, "seed": None}]), *kept]
    if not screened and len(runs) == 1:
        return row
    chosen = max(runs, key=lambda x: x["score"])
    scores = [x["score"] for x in runs]
    return {
        **row,
        **{
            k: chosen.get(k) for k in ("score", "agreement", "top1", "kl", "mse", "oscillation", "checkpoint")
        },
        "refined_seed": chosen["seed"],  # None: the trial's own run
        "refined_mean": statistics.fmean(scores),
        "refined_runs": len(scores),
        "refined_scores": json.dumps(scores),
        "refined_screened": screened,
    }


def refined_best(
    rows: Sequence[dict[str, Any]], again: dict[str, list[dict[str, Any]]], top: int = 0
) -> dict[str, Any] | None:
    """The best trial after refinement: of the ``top`` finalists with reruns (``again``: :func:`reruns`),
    the plan with the highest mean score, shipped as its highest-scoring run; the plain best when nothing
    was rerun."""
    pool = [with_reruns(r, again) for r in finalists(rows, top) if again.get(r["trial"])]
    if not pool:
        return best(rows)
    return max(pool, key=lambda r: (r["refined_mean"], -r["size_kib"]))
