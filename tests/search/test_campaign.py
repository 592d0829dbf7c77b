"""The campaign's pure helpers: warm starts, the sensitivity DP plan, and the storage check."""

from __future__ import annotations

import itertools
import os

import pytest

from dfq_search.errors import DfqError
from dfq_search.quant import LayerBits
from dfq_search.search import campaign
from dfq_search.search.campaign import check_storage, dp_plan, warm_starts
from dfq_search.search.define import PlanSpace
from dfq_search.search.space import load_space, parse_space

SENSITIVITY = {
    "features.0.0": {2: 9.0, 4: 2.0, 8: 0.0},
    "features.1.0": {2: 1.5, 4: 0.4, 8: 0.0},
    "features.2.0": {2: 0.9, 4: 0.5, 8: 0.0},
    "head.2": {2: 4.0, 4: 0.3, 8: 0.0},
}


def _plans(layers, budget, weight=None, activation=None, sensitivity=SENSITIVITY):
    space = parse_space(
        {
            "bits": {
                "weight": weight or {"_default": [2, 4, 8]},
                "activation": activation or {"_default": [8]},
            },
            "budget": budget,
        }
    )
    return PlanSpace(space, layers, sensitivity)


def _brute_force(plans: PlanSpace) -> float:
    best = float("inf")
    for ws in itertools.product(*(c.w for c in plans.choices)):
        bits = {c.name: LayerBits(w, c.a[-1]) for c, w in zip(plans.choices, ws, strict=True)}
        if plans.excess(plans.cost(bits)) <= 1e-9:
            best = min(best, sum(SENSITIVITY[n][b.w] for n, b in bits.items()))
    return best


@pytest.mark.parametrize(
    ("budget", "weight", "activation"),
    [
        ({"max_size_kib": 3.0}, None, None),
        ({"max_size_kib": 1.9}, None, None),
        ({"mean_weight_bits": 4.5}, None, None),
        ({"uniform_weight_bits": 4}, None, None),
        ({"uniform_weight_bits": 4}, {"_default": [2, 4, 8], "head.2": [8]}, None),
        # layers no rule covers stay float: their 32 bits are part of the size the budget limits
        ({"max_size_kib": 3.0}, {"re:features.*": [2, 4, 8]}, {"re:features.*": [8]}),
        ({"uniform_weight_bits": 4}, {"re:features.*": [2, 4, 8]}, {"re:features.*": [8]}),
    ],
)
def test_dp_plan_is_the_best_plan_under_the_budget(budget, weight, activation, layers_of):
    plans = _plans(layers_of("tiny_cnn"), budget, weight, activation)
    dp = dp_plan(plans)
    assert dp is not None and set(dp) == {c.name for c in plans.choices}
    assert plans.excess(plans.cost(dp)) <= 1e-9
    assert all(b.a == 8 for b in dp.values())
    assert sum(SENSITIVITY[n][b.w] for n, b in dp.items()) == pytest.approx(_brute_force(plans))


@pytest.mark.parametrize(
    "budget",
    [
        {"max_size_kib": 3.0},
        {"mean_weight_bits": 4.5},
        {"max_mbops": 10.0},  # a BOPs limit, which the DP cannot take
        {"uniform_bops": "W4A8"},
        {"max_size_kib": 2.5, "uniform_bops": "W4A8"},  # two limits at once
    ],
)
def test_the_hessian_ilp_plan_is_the_best_plan_under_every_limit(budget, layers_of):
    from dfq_search.search.starts import ilp_plan

    plans = _plans(layers_of("tiny_cnn"), budget)
    ilp = ilp_plan(plans, SENSITIVITY)
    assert ilp is not None and plans.excess(plans.cost(ilp)) <= 1e-9
    best = _brute_force(plans)
    assert best > 0, "the budget never binds: the test checks nothing"
    assert sum(SENSITIVITY[n][b.w] for n, b in ilp.items()) == pytest.approx(best)


ACT_SENSITIVITY = {  # features.0.0 reads the (float) image: no Ω^a
    "features.1.0": {2: 2.5, 4: 0.2, 8: 0.0},
    "features.2.0": {2: 0.3, 4: 0.1, 8: 0.0},
    "head.2": {2: 0.8, 4: 0.05, 8: 0.0},
}


@pytest.mark.parametrize(
    "budget",
    [
        {"uniform_bops": "W4A4"},
        {"uniform_weight_bits": 4, "uniform_bops": "W4A4"},
        {"max_size_kib": 2.5, "uniform_bops": "W8A2"},  # high weights buy low activations
    ],
)
def test_the_joint_ilp_plan_is_the_best_weight_and_activation_plan(budget, layers_of):
    """With Ω^a, the ILP chooses (weight, activation) pairs: its plan is the least Σ Ω + Ω^a of all."""
    from dfq_search.search.starts import ilp_plan

    plans = _plans(layers_of("tiny_cnn"), budget, activation={"_default": [2, 4, 8]})
    ilp = ilp_plan(plans, SENSITIVITY, ACT_SENSITIVITY)
    assert ilp is not None and plans.excess(plans.cost(ilp)) <= 1e-9

    def total(bits):
        return sum(SENSITIVITY[n][b.w] + ACT_SENSITIVITY.get(n, {}).get(b.a, 0.0) for n, b in bits.items())

    best = float("inf")
    for pairs in itertools.product(*(itertools.product(c.w, c.a) for c in plans.choices)):
        bits = {c.name: LayerBits(*p) for c, p in zip(plans.choices, pairs, strict=True)}
        if plans.excess(plans.cost(bits)) <= 1e-9:
            best = min(best, total(bits))
    assert best > 0, "the budget never binds: the test checks nothing"
    assert total(ilp) == pytest.approx(best)
    weights_only = ilp_plan(plans, SENSITIVITY)  # HAWQ-V3's own program, then the repair
    assert weights_only is not None and total(weights_only) >= total(ilp) - 1e-9


def test_warm_starts_include_the_hessian_plan_when_asked(layers_of):
    plans = _plans(layers_of("tiny_cnn"), {"max_size_kib": 3.0})
    starts = warm_starts(plans, ("sensitivity", "hessian"), SENSITIVITY)
    assert (
        set(starts) == {"sensitivity-dp", "hessian-ilp"} and starts["hessian-ilp"] == starts["sensitivity-dp"]
    )
    assert "hessian-ilp" not in warm_starts(plans, ("sensitivity",), SENSITIVITY)
    assert load_space("tiny_smoke").search.warm_start == ("uniform",)
    bits = {"weight": {"_default": [2, 4]}, "activation": {"_default": [8]}}
    assert parse_space({"bits": bits, "search": {"warm_start": ["hessian"]}}).search.warm_start == (
        "hessian",
    )


def test_no_dp_plan_without_sensitivity_or_under_a_bops_budget(layers_of):
    layers = layers_of("tiny_cnn")
    assert dp_plan(_plans(layers, {"max_size_kib": 3.0}, sensitivity=None)) is None
    assert dp_plan(_plans(layers, {"max_mbops": 10.0})) is None
    assert dp_plan(_plans(layers, {"uniform_bops": "W4A8"})) is None
    assert dp_plan(_plans(layers, {})) is None


def test_warm_starts_are_uniform_plans_that_fit_and_the_dp_plan(layers_of):
    layers = layers_of("tiny_resnet")
    plans = PlanSpace(load_space("tiny_smoke"), layers)
    starts = warm_starts(plans)
    assert list(starts) == ["uniform-w2/8"]  # uniform 4-bit is over the 3.0 mean bits; first/last at 8
    assert all(plans.excess(plans.cost(b)) <= 1e-9 for b in starts.values())
    assert {b.w for b in starts["uniform-w2/8"].values()} == {2, 8}

    sensitivity = {
        c.name: {w: (8 - w) * (1 + i) for w in c.w} for i, c in enumerate(plans.choices)
    }  # later layers more sensitive
    budget = {"mean_weight_bits": 4.0}
    space = parse_space(
        {"bits": {"weight": {"_default": [2, 4, 8]}, "activation": {"_default": [4, 8]}}, "budget": budget}
    )
    plans = PlanSpace(space, layers, sensitivity)
    starts = warm_starts(plans)
    assert set(starts) == {"uniform-w4", "uniform-w2", "sensitivity-dp"}
    assert all(plans.excess(plans.cost(b)) <= 1e-9 for b in starts.values())
    assert starts["uniform-w4"] == {c.name: LayerBits(4, 8) for c in plans.choices}


def test_check_storage_makes_the_folder_and_leaves_no_probe(tmp_path):
    run_dir = tmp_path / "runs" / "new"
    check_storage(run_dir, resume=False)
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []


def test_check_storage_refuses_an_existing_campaign_unless_resumed(tmp_path):
    (tmp_path / "campaign.json").write_text("{}")
    with pytest.raises(DfqError, match="a campaign already exists.*--resume"):
        check_storage(tmp_path, resume=False)
    assert (tmp_path / "campaign.json").read_text() == "{}"
    check_storage(tmp_path, resume=True)


def test_check_storage_refuses_a_path_it_cannot_write(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DfqError, match="storage path is not writable"):
        check_storage(tmp_path / "file" / "run", resume=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_storage_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DfqError, match=r"storage path is not writable: got '.*locked'"):
            check_storage(locked, resume=False)
    finally:
        locked.chmod(0o700)


def test_check_storage_refuses_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "MIN_FREE_BYTES", 2**62)
    with pytest.raises(DfqError, match="not enough free disk space"):
        check_storage(tmp_path, resume=False)


def test_the_label_free_metric_is_the_default_unless_a_resumed_campaign_started_with_another(tmp_path):
    import json
    from dataclasses import replace

    from dfq_search.search.objective import DEFAULT_LABEL_FREE

    space = load_space("tiny_smoke")
    auto = replace(space, objective=replace(space.objective, metric="auto"))
    assert campaign._label_free(auto, tmp_path, resume=False) == DEFAULT_LABEL_FREE == "mse"
    (tmp_path / "campaign.json").write_text(json.dumps({"objective": "kl"}))  # started before the default
    assert campaign._label_free(auto, tmp_path, resume=True) == "kl"
    assert campaign._label_free(auto, tmp_path, resume=False) == "mse"
    agree = replace(space, objective=replace(space.objective, metric="agreement"))
    assert campaign._label_free(agree, tmp_path, resume=True) == "agreement"


def test_activation_sensitivity_is_measured_once_where_activations_are_searched(tmp_path, layers_of):
    import torch

    from dfq_search.models import create_model
    from dfq_search.search.starts import act_sensitivity

    bundle, layers, logs = create_model("tiny_cnn"), layers_of("tiny_cnn"), []
    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def space(acts):
        return parse_space({"bits": {"weight": {"_default": [2, 4, 8]}, "activation": {"_default": acts}}})

    assert act_sensitivity(bundle, calib, space([8]), layers, tmp_path, "cpu", logs.append) is None
    assert not (tmp_path / "act_sensitivity.json").exists()
    sens = act_sensitivity(bundle, calib, space([2, 8]), layers, tmp_path, "cpu", logs.append)
    assert set(sens) == {"features.1.0", "features.2.0", "head.2"}  # not the layer reading the image
    assert all(set(v) == {2, 8} and v[2] > v[8] for v in sens.values())
    again = act_sensitivity(bundle, calib * 0, space([2, 8]), layers, tmp_path, "cpu", logs.append)
    assert again == sens and len(logs) == 1  # read back from the campaign folder, not remeasured


def test_weight_sensitivity_is_not_measured_for_a_space_of_one_plan(tmp_path, layers_of):
    import torch

    from dfq_search.models import create_model
    from dfq_search.search.starts import sensitivity

    bundle, layers, logs = create_model("tiny_cnn"), layers_of("tiny_cnn"), []
    calib = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    one = parse_space({"bits": {"weight": {"_default": [4]}, "activation": {"_default": [8]}}})
    assert sensitivity(bundle, calib, one, layers, tmp_path, "cpu", logs.append) is None and not logs
    assert not (tmp_path / "sensitivity.json").exists()
    two = parse_space({"bits": {"weight": {"_default": [2, 4]}, "activation": {"_default": [8]}}})
    assert set(sensitivity(bundle, calib, two, layers, tmp_path, "cpu", logs.append)) and len(logs) == 1


def test_the_campaign_reruns_its_finalists_at_the_space_refine_iters(tmp_path, monkeypatch):
    """search.refine_iters reaches the reruns (a value accepted is a value used)."""
    from types import SimpleNamespace

    from dfq_search.search import refine as refine_module
    from dfq_search.search.space import Resources, Search

    seen = {}
    monkeypatch.setattr(refine_module, "refine", lambda *args: seen.setdefault("args", args))
    monkeypatch.setattr(campaign, "result_rows", lambda records, reports: [])
    prep = SimpleNamespace(ctx=SimpleNamespace(reports=2), starts={})
    runner = SimpleNamespace(records=lambda run_dir: [])
    search = Search(refine_top=2, refine_seeds=3, refine_iters=400)
    campaign._refine(tmp_path, prep, runner, search, Resources(), None, lambda line: None)
    assert seen["args"][3] == 3 and seen["args"][-1] == 400
    spaced = parse_space({"bits": {"weight": {"_default": [2, 4]}, "activation": {"_default": [8]}},
                          "search": {"refine_top": 1, "refine_iters": 400}})  # fmt: skip
    assert spaced.search.refine_iters == 400
