"""ZeroQ sensitivity and the DP bit allocation (checked against brute force)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.models import create_model
from dfq_search.ptq.sensitivity import act_sensitivity, allocate_bits, sensitivity_plan, zeroq_sensitivity


def _brute(sens, params, budget):
    names = list(sens)
    best = None
    for combo in itertools.product(*(sorted(sens[n]) for n in names)):
        size = sum(params[n] * k for n, k in zip(names, combo, strict=True))
        cost = sum(sens[n][k] for n, k in zip(names, combo, strict=True))
        if size <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, dict(zip(names, combo, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_dp_allocation_is_optimal(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(6)]
    params = {n: rng.randint(10, 200) for n in names}
    sens = {n: {k: rng.random() * 2.0 ** (-k) * rng.randint(1, 10) for k in (2, 3, 4, 8)} for n in names}
    budget = 4 * sum(params.values())
    got = allocate_bits(sens, params, budget)
    cost, _ = _brute(sens, params, budget)
    assert sum(params[n] * k for n, k in got.items()) <= budget
    assert sum(sens[n][k] for n, k in got.items()) == pytest.approx(cost)


def test_budget_too_small_is_refused():
    with pytest.raises(DfqError, match="budget"):
        allocate_bits({"a": {2: 1.0, 4: 0.0}}, {"a": 10}, 19)


def test_sensitivity_falls_with_bits_and_leaves_p_untouched():
    bundle = create_model("tiny_cnn")
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    batches = [torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))]
    sens = zeroq_sensitivity(bundle.model, batches, bits=(2, 4, 8))
    assert set(sens) == {"features.0.0", "features.1.0", "features.2.0", "head.2"}
    for omega in sens.values():
        assert omega[2] > omega[4] > omega[8] >= 0
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())
    plan, _ = sensitivity_plan(bundle.model, batches, 4.0, bits=(2, 4, 8), pinned={"head.2": 8})
    resolved = plan.resolve(list(sens))
    assert resolved["head.2"].w == 8 and resolved["head.2"].a == 8
    params = {n: bundle.model.get_submodule(n).weight.numel() for n in sens}
    assert sum(params[n] * b.w for n, b in resolved.items()) <= 4.0 * sum(params.values())


def test_act_sensitivity_falls_with_bits_skips_the_input_layer_and_leaves_p_untouched():
    bundle = create_model("tiny_cnn")
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    batches = [torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))]
    sens = act_sensitivity(bundle.model, batches, bits=(2, 4, 8), skip=["features.0.0"])
    assert set(sens) == {"features.1.0", "features.2.0", "head.2"}
    for omega in sens.values():
        assert omega[2] > omega[4] > omega[8] >= 0
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())


def test_act_sensitivity_is_the_kl_of_that_layer_input_alone_quantized():
    """Ω^a at 2 bits equals the KL of P against P with one layer's input quantized by hand."""
    from dfq_search.ptq.calibrate import mse_act_range
    from dfq_search.quant.quantizers import fake_quant, qparams

    bundle = create_model("tiny_cnn")
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = act_sensitivity(bundle.model, [x], bits=(2,))["features.2.0"][2]
    p, layer = bundle.model.eval(), bundle.model.get_submodule("features.2.0")
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].flatten()))
    with torch.no_grad():
        ref = p(x)
    handle.remove()
    scale, zp = qparams(*map(torch.tensor, mse_act_range(seen[0], 2)), 2)
    handle = layer.register_forward_pre_hook(lambda _m, args: (fake_quant(args[0], scale, zp, 2),))
    with torch.no_grad():
        out = p(x)
    handle.remove()
    want = torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True,
                                      reduction="batchmean")  # fmt: skip
    assert want > 1e-7 and got == pytest.approx(float(want), rel=1e-3)
