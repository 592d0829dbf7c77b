"""run_ptq end to end on a tiny model: P untouched, Q plain, reconstruction helps, bad input refused."""

from __future__ import annotations

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.ptq import PTQConfig, ReconConfig, oscillation, rise, run_ptq
from dfq_search.ptq.adaround import AdaRoundWeightQuantizer
from dfq_search.ptq.calibrate import calibrate_ranges_, reestimate_bn_
from dfq_search.quant import PROTOCOLS, BitPlan, quantized_copy

RECON = ReconConfig(iters=60, lr=1e-2)


def _logit_error(q, p, batches):
    with torch.no_grad():
        return sum(float((q(x) - p(x)).pow(2).mean()) for x in batches)


def test_reconstruction_lowers_the_output_error_and_leaves_p_untouched(tiny, batches, ptq_plan):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    plan = ptq_plan(tiny, 2, 4)
    rtn = run_ptq(tiny.model, plan, batches, PTQConfig(reconstruct=False))
    res = run_ptq(tiny.model, plan, batches, PTQConfig(modcap_k=1, recon=RECON))
    assert res.groups == [["stem.0"], ["block1", "block2"], ["head.2"]]
    assert _logit_error(res.model, tiny.model, batches) < 0.8 * _logit_error(rtn.model, tiny.model, batches)
    assert res.unit_errors[2] < rtn.unit_errors[2]
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert not any(isinstance(m, AdaRoundWeightQuantizer) for m in res.model.modules())
    fresh = quantized_copy(tiny.model, plan, batches[0][:1], PROTOCOLS["ptq"].config)
    fresh.load_state_dict(res.model.state_dict())  # a plain quantized model: same keys


def test_bad_input_is_refused_before_compute(tiny, batches, ptq_plan):
    plan = ptq_plan(tiny, 4, 4)
    with pytest.raises(DfqError, match="k <= 1"):
        run_ptq(tiny.model, plan, batches, PTQConfig(modcap_k=2))
    with pytest.raises(DfqError, match="at least one batch"):
        run_ptq(tiny.model, plan, [], PTQConfig())
    with pytest.raises(DfqError, match="allowed"):
        BitPlan.uniform(7, 4)
    with pytest.raises(DfqError, match="act_range"):
        PTQConfig(act_range="max")


def test_ranges_and_bn_reestimation(tiny, batches, ptq_plan):
    q = quantized_copy(tiny.model, ptq_plan(tiny, 4, 4), batches[0][:1], PROTOCOLS["ptq"].config)
    calibrate_ranges_(q, batches, "minmax")
    q_pct = quantized_copy(tiny.model, ptq_plan(tiny, 4, 4), batches[0][:1], PROTOCOLS["ptq"].config)
    calibrate_ranges_(q_pct, batches, "percentile", percentile=99.0)
    quant, quant_pct = q.block2.body[1][0].act_quant, q_pct.block2.body[1][0].act_quant
    lo, hi = quant.tracked_range()
    lo_p, hi_p = quant_pct.tracked_range()
    assert bool(quant.frozen) and lo <= lo_p < hi_p < hi
    bn_p = tiny.model.block1.body[0][1].running_mean.clone()
    reestimate_bn_(q, batches)
    assert torch.equal(tiny.model.block1.body[0][1].running_mean, bn_p)
    assert not torch.allclose(q.block1.body[0][1].running_mean, bn_p)


def test_oscillation_figures():
    assert oscillation([1, 2, 3, 4]) == 0 and rise([1, 2, 3, 4]) == 3
    assert oscillation([1, 3, 2, 4]) == pytest.approx(2.0)  # |2|+|1|+|2| - 3
    assert rise([1, 3, 2, 4]) == 4


def test_hand_given_merges(tiny, batches, ptq_plan):
    plan = ptq_plan(tiny, 4, 4)
    fast = PTQConfig(merges=(("block1", "block2"),), recon=ReconConfig(iters=2))
    assert run_ptq(tiny.model, plan, batches, fast).groups == [["stem.0"], ["block1", "block2"], ["head.2"]]
    with pytest.raises(DfqError, match="did you mean 'block1'"):
        run_ptq(tiny.model, plan, batches, PTQConfig(merges=(("blok1", "block2"),)))
    with pytest.raises(DfqError, match="adjacent"):
        run_ptq(tiny.model, plan, batches, PTQConfig(merges=(("stem.0", "block1"),)))
