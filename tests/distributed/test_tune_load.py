"""Load: a 200-trial campaign of a tiny model records every trial, with the driver's memory bounded.

Slow (several minutes on 2 cores): ``pytest -m slow tests/distributed/test_tune_load.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 200


@pytest.mark.slow
def test_200_trial_campaign_records_every_trial_and_driver_memory_stays_bounded(tmp_path, shared_cache):
    space = yaml.safe_load((ROOT / "search_spaces" / "tiny_smoke.yaml").read_text())
    space["method"]["ptq"] |= {"recon.iters": 2}
    space["search"] |= {"trials": TRIALS, "sampler": "random", "warm_start": []}
    path = tmp_path / "load.yaml"
    path.write_text(yaml.safe_dump(space))
    env = {**os.environ, "DFQ_SEARCH_CACHE": str(shared_cache), "OMP_WAIT_POLICY": "PASSIVE"}
    argv = [sys.executable, "-m", "dfq_search.cli", "run", "--space", str(path), "--storage", str(tmp_path),
            "--num-cpus", "2", "--name", "load"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "load"
    rows = pq.read_table(run / "results.parquet").to_pylist()
    assert len(rows) == TRIALS and len({r["trial"] for r in rows}) == TRIALS
    assert all(r["status"] in ("complete", "stopped") and r["score"] is not None for r in rows)
    memory = json.loads((run / "summary.json").read_text())["driver_memory"]
    assert memory["peak_mb"] - memory["before_trials_mb"] < 500, memory
