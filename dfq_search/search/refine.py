"""The campaign's finalists, re-run with other reconstruction seeds before the best is named.

A plan's score is one draw: its reconstruction's seed moves top-1 by 0.3-0.5 points on ResNet-20
(``benchmarks/plan_seeds.py``), as much as the plans of a campaign's top differ, so the highest single
score is partly luck (the winner's curse). The ``search.refine_top`` best complete plans are each run
``search.refine_seeds`` more times (seeds ``seed + 1 ...``; same settings); the best plan is the one
with the highest mean score, and the model shipped is its run that scored highest on the objective.
Every rerun is kept in ``<campaign>/refine/<config hash>/`` (metrics.json, model.pt) as it ends, so a
resumed campaign, or ``dfq-search report``, finds them without running them again.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dfq_search.fingerprint import config_hash
from dfq_search.search.results import best, candidates
from dfq_search.search.trial import Memo

REFINE_DIR = "refine"
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
    run_dir: Path, rows: Sequence[dict[str, Any]], configs: dict[str, dict], top: int, seeds: int
) -> list[tuple[str, dict[str, Any]]]:
    """(trial, config) of every rerun of the finalists not yet kept in the refine folder."""
    jobs = []
    for r in finalists(rows, top):
        config = configs.get(r["trial"])
        if config is None:
            continue
        for i in range(1, seeds + 1):
            again = {**config, "seed": int(config.get("seed", 0)) + i}
            if not (run_dir / REFINE_DIR / config_hash(again) / "metrics.json").is_file():
                jobs.append((r["trial"], again))
    return jobs


def refine(run_dir: Path, rows, configs, top: int, seeds: int, run: Callable, log: Log = print) -> None:
    """Run the missing reruns through ``run(configs, done)`` (the Ray side) and keep each as it ends."""
    jobs = rerun_configs(run_dir, rows, configs, top, seeds)
    if not jobs:
        return
    log(f"refining the {top} best plans: {len(jobs)} reruns with other reconstruction seeds ...")

    def done(i: int, metrics: dict | None, blob: bytes | None, error: str | None) -> None:
        trial, config = jobs[i]
        if metrics is None or blob is None:
            log(f"  rerun {i + 1}/{len(jobs)} of trial {trial} (seed {config['seed']}) failed: {error}")
            return
        from dfq_search.distributed.rerun import write_model

        seed, memo = config["seed"], Memo(str(run_dir / REFINE_DIR), config)
        with write_model(blob) as folder:
            memo.save({**metrics, "trial": trial, "seed": seed}, Path(folder))
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


def refined_best(run_dir: Path, rows: Sequence[dict[str, Any]], top: int = 0) -> dict[str, Any] | None:
    """The best trial after refinement: of the finalists with reruns, the plan with the highest mean
    score, shipped as its highest-scoring run; the plain best when nothing was rerun."""
    again = reruns(run_dir)
    pool = [r for r in (finalists(rows, top) if top else candidates(rows)) if again.get(r["trial"])]
    if not pool:
        return best(rows)

    def runs(r: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**r, "seed": None}, *again[r["trial"]]]

    winner = max(pool, key=lambda r: (statistics.fmean(x["score"] for x in runs(r)), -r["size_kib"]))
    chosen = max(runs(winner), key=lambda x: x["score"])
    scores = [x["score"] for x in runs(winner)]
    return {
        **winner,
        **{k: chosen.get(k) for k in ("score", "agreement", "top1", "kl", "oscillation", "checkpoint")},
        "refined_seed": chosen["seed"],  # None: the trial's own run
        "refined_mean": statistics.fmean(scores),
        "refined_runs": len(scores),
        "refined_scores": json.dumps(scores),
    }
