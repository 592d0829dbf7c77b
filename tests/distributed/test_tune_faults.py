"""Faults inside trials on a local Ray: a trial that raises or reports NaN is recorded as failed with its
reason after a bounded number of retries, and the campaign goes on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from dfq_search.distributed import init, shutdown  # noqa: E402
from dfq_search.distributed.runner import records_of  # noqa: E402
from dfq_search.distributed.tune import TuneSetup, run_tuner  # noqa: E402
from dfq_search.models import create_model  # noqa: E402
from dfq_search.quant import LayerBits, trace_layers  # noqa: E402
from dfq_search.search.define import PlanSpace, SpaceFunction  # noqa: E402
from dfq_search.search.objective import FidelityScorer  # noqa: E402
from dfq_search.search.results import result_rows  # noqa: E402
from dfq_search.search.space import load_space  # noqa: E402
from dfq_search.search.trial import TrialContext  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
PROBE = "block1.body.0.0"


class FaultyScorer:
    """Scores normally, except: weight bits 2 at PROBE -> NaN; activation bits 4 there -> raises.
    Every fault appends a line to ``log`` (to count the attempts)."""

    def __init__(self, inner: FidelityScorer, log: Path) -> None:
        self.inner, self.log = inner, log

    def __call__(self, q, fraction: float = 1.0) -> dict:
        layer = q.get_submodule(PROBE)
        out = self.inner(q, fraction)
        if layer.weight_quant.bits == 2:
            with self.log.open("a") as f:
                f.write("nan\n")
            return {**out, "score": float("nan")}
        if layer.act_quant is not None and layer.act_quant.bits == 4:
            with self.log.open("a") as f:
                f.write("raise\n")
            raise RuntimeError("injected fault in the objective")
        return out


@pytest.fixture(scope="module")
def ray_session():
    init(num_cpus=2, namespace="dfq_search_fault_tests")
    yield
    shutdown()


def test_failed_and_nan_trials_are_recorded_and_the_campaign_goes_on(ray_session, tmp_path):
    bundle = create_model("tiny_resnet")
    space = load_space("tiny_smoke")
    plans = PlanSpace(space, trace_layers(bundle.model, bundle.preprocess.example_input()))
    gen = torch.Generator().manual_seed(0)
    calib, held = torch.randn(2, 32, *bundle.preprocess.shape, generator=gen)
    log = tmp_path / "faults.log"
    ctx = TrialContext(bundle.model, bundle.name, bundle.num_classes, bundle.preprocess.shape, calib,
                       FaultyScorer(FidelityScorer(bundle.model, held), log), reports=2)  # fmt: skip
    low = {c.name: LayerBits(c.w[0], c.a[-1]) for c in plans.choices}  # probe at 2 bits: NaN
    a4 = {**low, PROBE: LayerBits(4, 4)}  # probe activations at 4 bits: raises
    ok = {**low, PROBE: LayerBits(4, 8)}
    points = [plans.params_of(b) for b in (low, a4, ok)]
    setup = TuneSetup(
        space_fn=SpaceFunction(plans),
        points=points,
        ctx=ctx,
        trials=3,
        sampler="random",
        seed=0,
        concurrency=2,
        mode="pareto",
        reports=2,
        trial_cpu=1.0,
        trial_gpu=0.0,
        max_failures=1,
    )
    grid = run_tuner(setup, str(tmp_path), "faults", resume=False)
    rows = {r["plan"]: r for r in result_rows(records_of(grid), 2)}
    assert len(rows) == 3
    by_kind = {}
    for r in rows.values():
        plan = __import__("json").loads(r["plan"])
        by_kind[(plan[PROBE]["w"], plan[PROBE]["a"])] = r
    assert by_kind[(2, 8)]["status"] == "failed" and "not finite" in by_kind[(2, 8)]["error"]
    assert by_kind[(4, 4)]["status"] == "failed" and "injected fault" in by_kind[(4, 4)]["error"]
    assert by_kind[(4, 8)]["status"] == "complete" and by_kind[(4, 8)]["checkpoint"]
    attempts = log.read_text().splitlines()
    assert attempts.count("nan") == 2 and attempts.count("raise") == 2  # one retry each (max_failures=1)
