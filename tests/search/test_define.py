"""A space made concrete for a model: layer choices, budgets, repair, Optuna's define-by-run function."""

from __future__ import annotations

import pickle
import random

import optuna
import pytest
import torch
from torch import nn

from dfq_search.errors import DfqError
from dfq_search.quant import LayerBits, trace_layers
from dfq_search.search.define import PlanSpace, SpaceFunction, layer_choices
from dfq_search.search.space import parse_space

TINY_CNN_PARAMS = {"features.0.0": 216, "features.1.0": 1152, "features.2.0": 4608, "head.2": 320}
TINY_CNN_MACS = {"features.0.0": 55296, "features.1.0": 73728, "features.2.0": 73728, "head.2": 320}


def _space(weight, activation, **sections):
    return parse_space({"bits": {"weight": weight, "activation": activation}, **sections})


def _kib(bits: dict[str, int], params=TINY_CNN_PARAMS) -> float:
    return sum(params[n] * b for n, b in bits.items()) / 8192


def _uniform(plans: PlanSpace, w: int, a: int) -> dict[str, LayerBits]:
    return {c.name: LayerBits(w, a) for c in plans.choices}


def test_tiny_cnn_is_what_the_hand_computed_costs_assume(layers_of):
    layers = layers_of("tiny_cnn")
    assert {i.name: i.params for i in layers} == TINY_CNN_PARAMS
    assert {i.name: i.macs for i in layers} == TINY_CNN_MACS
    assert [i.name for i in layers if i.reads_model_input] == ["features.0.0"]


def test_rule_precedence(layers_of):
    weight = {
        "block2.body.0.0": [5],  # an exact name beats every other rule ...
        "head.2": [6],  # ... _first_last included
        "_first_last": [8],
        "re:stem.*": [2],  # _first_last beats a pattern
        r"re:block1\..*": [3],  # the first matching pattern wins
        r"re:block1\.body\.1.*": [5],
        r"re:block2\.body.*": [4],
        "_default": [4, 2],  # block2.shortcut.0 only; sorted
    }
    space = _space(weight, {"_default": [8], "re:block.*": [4], "_first_last": [6]})
    got = {c.name: (c.w, c.a) for c in layer_choices(space, layers_of("tiny_resnet"))}
    assert got == {
        "stem.0": ((8,), (6,)),
        "block1.body.0.0": ((3,), (4,)),
        "block1.body.1.0": ((3,), (4,)),
        "block2.body.0.0": ((5,), (4,)),
        "block2.body.1.0": ((4,), (4,)),
        "block2.shortcut.0": ((2, 4), (4,)),
        "head.2": ((6,), (6,)),
    }


def test_layers_no_rule_covers_stay_float(layers_of):
    layers = layers_of("tiny_resnet")
    space = _space({"re:block.*": [2, 4]}, {"re:block.*": [4]})
    plans = PlanSpace(space, layers)
    assert [c.name for c in plans.choices] == [i.name for i in layers if i.name.startswith("block")]
    bits = {c.name: LayerBits(2, 4) for c in plans.choices}
    params = {i.name: i.params for i in layers}
    cost = plans.cost(bits)
    quantized = sum(params[n] for n in bits)
    assert cost["size_kib"] == pytest.approx(
        (2 * quantized + 32 * (params["stem.0"] + params["head.2"])) / 8192
    )
    assert cost["mean_weight_bits"] == pytest.approx(2.0)  # over the quantized layers only
    assert set(plans.evaluate({})[0].to_dict()) == set(bits)


def test_weight_rules_without_activation_rules_are_refused(layers_of):
    with pytest.raises(DfqError, match="'head.2' has weight bits only"):
        layer_choices(_space({"_default": [4]}, {"re:features.*": [8]}), layers_of("tiny_cnn"))


class TwoStems(nn.Module):
    """Two convolutions read the image; the linear head runs last."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.mid(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def test_first_last_is_every_layer_reading_the_image_and_the_last(layers_of):
    layers = trace_layers(TwoStems(), torch.zeros(1, 3, 8, 8))
    space = _space({"_first_last": [8], "_default": [2]}, {"_default": [4]})
    got = {c.name: c.w for c in layer_choices(space, layers)}
    assert got == {"a": (8,), "b": (8,), "mid": (2,), "fc": (8,)}
    got = {c.name: c.w for c in layer_choices(space, layers_of("tiny_mobilenet"))}
    assert {n for n, w in got.items() if w == (8,)} == {"stem.0", "head.2"}


def test_rules_naming_missing_layers_are_refused(layers_of):
    layers = layers_of("tiny_resnet")
    with pytest.raises(
        DfqError,
        match=r"names a layer the model lacks \(did you mean .*'block1.body.0.0'.*got 'block1.body.0'",
    ):
        layer_choices(_space({"block1.body.0": [4], "_default": [8]}, {"_default": [8]}), layers)
    with pytest.raises(DfqError, match=r"bits.activation pattern matches no layer: got 're:layer3\\\\..*'"):
        layer_choices(_space({"_default": [8]}, {r"re:layer3\..*": [4], "_default": [8]}), layers)


def test_an_impossible_budget_is_refused(layers_of):
    space = _space({"_default": [2, 4]}, {"_default": [8]}, budget={"max_size_kib": 1.0})
    with pytest.raises(DfqError, match="impossible budget: even the smallest plan exceeds it"):
        PlanSpace(space, layers_of("tiny_cnn"))  # all 2-bit: 6296 * 2 / 8192 = 1.54 KiB
    space = _space({"_default": [2]}, {"_default": [8]}, budget={"max_size_kib": 6296 * 2 / 8192})
    PlanSpace(space, layers_of("tiny_cnn"))  # exactly the smallest plan, the only one offered: reachable


def test_a_budget_that_only_the_smallest_plan_fits_is_refused(layers_of):
    """The size of uniform 2-bit weights with 2 as every layer's lowest choice: every trial would be
    repaired to the uniform 2-bit plan, so the campaign is refused before compute."""
    layers = layers_of("tiny_cnn")
    exact = {"max_size_kib": 6296 * 2 / 8192}
    with pytest.raises(DfqError, match="the budget leaves nothing to search") as err:
        PlanSpace(_space({"_default": [2, 4]}, {"_default": [8]}, budget=exact), layers)
    assert "budget.max_size_kib: 1.53" in str(err.value)

    def uniform(w: int) -> PlanSpace:
        space = _space({"_default": [2, 3, 4]}, {"_default": [8]}, budget={"uniform_weight_bits": w})
        return PlanSpace(space, layers)

    with pytest.raises(DfqError, match="the budget leaves nothing to search"):
        uniform(2)
    roomy = uniform(3)  # one layer at 3 bits fits under uniform 3-bit weights: the repair keeps a 3 or 4
    repaired = roomy.repair(_uniform(roomy, 4, 8))
    assert max(b.w for b in repaired.values()) > 2
    acts = _space({"_default": [2]}, {"_default": [4, 8]}, budget={"max_mbops": 1e9})
    PlanSpace(acts, layers)  # the weights are pinned, the activations' choices fit: a search


BUDGETS = [
    {"max_size_kib": 4.0},
    {"mean_weight_bits": 3.5},
    {"max_mbops": 50.0},
    {"uniform_bops": "W3A4"},
    {"uniform_weight_bits": 3},
    {"uniform_weight_bits": 3, "uniform_bops": "W3A4"},  # both: the size and the BOPs of W3A4
]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: "+".join(b))
def test_repair_fits_the_budget_and_only_lowers_bits(budget, layers_of):
    space = _space(
        {"_first_last": [8], "_default": [2, 3, 4, 8]},
        {"_first_last": [8], "_default": [2, 4, 8]},
        budget=budget,
    )
    plans = PlanSpace(space, layers_of("tiny_mobilenet"))
    rng = random.Random(0)
    lowered = 0
    for _ in range(25):
        bits = {c.name: LayerBits(rng.choice(c.w), rng.choice(c.a)) for c in plans.choices}
        fixed = plans.repair(bits)
        assert plans.excess(plans.cost(fixed)) <= 1e-9
        for c in plans.choices:
            assert fixed[c.name].w in c.w and fixed[c.name].a in c.a
            assert fixed[c.name].w <= bits[c.name].w and fixed[c.name].a <= bits[c.name].a
        if plans.excess(plans.cost(bits)) <= 0:
            assert fixed == bits  # a fitting plan is left alone
        lowered += fixed != bits
    assert lowered > 0, "the budget never binds: the test checks nothing"


def test_a_size_and_a_bops_limit_together(layers_of):
    from dfq_search.search.starts import dp_plan

    weight, act = {"_first_last": [8], "_default": [2, 3, 4, 8]}, {"_first_last": [8], "_default": [2, 4, 8]}
    size_only = PlanSpace(_space(weight, act, budget={"uniform_weight_bits": 3}), layers_of("tiny_mobilenet"))
    plans = PlanSpace(
        _space(weight, act, budget={"uniform_weight_bits": 3, "uniform_bops": "W3A4"}),
        layers_of("tiny_mobilenet"),
    )
    uniform = plans.uniform(3, 4)
    assert plans.excesses(plans.cost(uniform)) == pytest.approx([0.0, 0.0], abs=1e-9)  # W3A4 fits exactly
    a8 = plans.uniform(3, 8)  # the same size, twice the BOPs: only the second limit is exceeded
    over = plans.excesses(plans.cost(a8))
    assert (
        over[0] == pytest.approx(0.0, abs=1e-9) and over[1] > 0 and size_only.excess(size_only.cost(a8)) <= 0
    )
    fixed = plans.repair(a8)
    assert plans.excess(plans.cost(fixed)) <= 1e-9 and any(fixed[n].a < 8 for n in fixed)
    strict = PlanSpace(
        _space(weight, act, budget={"uniform_weight_bits": 3, "uniform_bops": "W3A4", "repair": False}),
        layers_of("tiny_mobilenet"),
    )
    told = _constraints(strict, plans.params_of(a8))
    assert told == pytest.approx({"uniform_weight_bits": 0.0, "uniform_bops": over[1]}, abs=1e-9)
    sens = {c.name: {w: 1.0 / w for w in c.w} for c in plans.choices}
    dp = dp_plan(PlanSpace(plans.space, plans.layers, sens))
    assert dp is not None and plans.excess(plans.cost(dp)) <= 1e-9
    with pytest.raises(DfqError, match="budget.max_mbops: 0.001"):
        PlanSpace(_space(weight, act, budget={"uniform_weight_bits": 3, "max_mbops": 0.001}), plans.layers)


def _order_space(repair=True):
    budget = {"max_size_kib": _kib({n: 8 for n in TINY_CNN_PARAMS}) - 0.5, "repair": repair}
    return _space({"_first_last": [8], "_default": [4, 8]}, {"_default": [8]}, budget=budget)


@pytest.mark.parametrize(
    ("sensitivity", "lowered"),
    [
        (None, "features.2.0"),  # no sensitivity: the largest saving (4608 params) first
        ({"features.1.0": {4: 1.0, 8: 0.0}, "features.2.0": {4: 10.0, 8: 0.0}}, "features.1.0"),
        # features.2.0 harms more, but per bit saved less (2 / 18432 < 1 / 4608)
        ({"features.1.0": {4: 1.0, 8: 0.0}, "features.2.0": {4: 2.0, 8: 0.0}}, "features.2.0"),
    ],
)
def test_repair_lowers_the_least_sensitive_per_bit_first(sensitivity, lowered, layers_of):
    plans = PlanSpace(_order_space(), layers_of("tiny_cnn"), sensitivity)
    full = {c.name: LayerBits(8, 8) for c in plans.choices}
    fixed = plans.repair(full)
    assert {n for n in full if fixed[n] != full[n]} == {lowered}
    assert fixed[lowered] == LayerBits(4, 8)


def _bops_space(weight, activation):
    all8 = sum(TINY_CNN_MACS.values()) * 64 + TINY_CNN_MACS["features.0.0"] * 8 * (32 - 8)  # float image
    return _space(weight, activation, budget={"max_mbops": (all8 - 1) / 1e6})


def test_a_bops_repair_weighs_a_weight_move_by_the_bops_it_saves(layers_of):
    """features.1.0 and features.2.0 have the same MACs (4x apart in parameters): lowering either's
    weights saves the same BOPs, so the less sensitive one goes first."""
    sens = {"features.1.0": {4: 1.0, 8: 0.0}, "features.2.0": {4: 2.0, 8: 0.0}}
    space = _bops_space({"_first_last": [8], "_default": [4, 8]}, {"_default": [8]})
    fixed = PlanSpace(space, layers_of("tiny_cnn"), sens).repair({n: LayerBits(8, 8) for n in TINY_CNN_MACS})
    assert {n for n, b in fixed.items() if b != LayerBits(8, 8)} == {"features.1.0"}


@pytest.mark.parametrize(
    ("act_sensitivity", "lowered"),
    [
        (None, "features.1.0"),  # the same BOPs saved, nothing known: the first in order
        ({"features.1.0": {4: 3.0, 8: 0.0}, "features.2.0": {4: 1.0, 8: 0.0}}, "features.2.0"),
    ],
)
def test_a_bops_repair_lowers_the_least_sensitive_activations_first(act_sensitivity, lowered, layers_of):
    space = _bops_space({"_default": [8]}, {"_default": [4, 8]})
    plans = PlanSpace(space, layers_of("tiny_cnn"), None, act_sensitivity)
    fixed = plans.repair({n: LayerBits(8, 8) for n in TINY_CNN_MACS})
    assert {n for n, b in fixed.items() if b != LayerBits(8, 8)} == {lowered}
    assert fixed[lowered] == LayerBits(8, 4)


def test_repair_false_reports_infeasible_and_the_constraint_steers(layers_of):
    plans = PlanSpace(_order_space(repair=False), layers_of("tiny_cnn"))
    over = {"w:features.1.0": 8, "w:features.2.0": 8}
    fits = {"w:features.1.0": 8, "w:features.2.0": 4}
    plan, cost, feasible = plans.evaluate(over)
    assert not feasible and plan.to_dict()["features.2.0"] == {"w": 8, "a": 8}
    assert cost["size_kib"] == pytest.approx(_kib({n: 8 for n in TINY_CNN_PARAMS}))
    assert plans.evaluate(fits)[2]
    assert _constraints(plans, over) == pytest.approx({"max_size_kib": 0.5})
    assert _constraints(plans, fits)["max_size_kib"] <= 0
    repaired = PlanSpace(_order_space(repair=True), layers_of("tiny_cnn"))
    plan, _, feasible = repaired.evaluate(over)
    assert feasible and plan.to_dict()["features.2.0"]["w"] == 4
    assert _constraints(repaired, over) == {}  # repaired plans always fit: no constraint to steer by


def _constraints(plans: PlanSpace, params: dict) -> dict[str, float]:
    """The constraints the (pickled) space function gives Optuna for a trial of ``params``."""
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(params)
    trial = study.ask()
    pickle.loads(pickle.dumps(SpaceFunction(plans)))(trial)
    study.tell(trial, 0.0)
    return study.trials[-1].constraints


def test_uniform_weight_bits_budget_is_the_size_of_that_uniform_plan(layers_of):
    space = _space({"_default": [2, 3, 4, 8]}, {"_default": [2, 4, 8]}, budget={"uniform_weight_bits": 3})
    plans = PlanSpace(space, layers_of("tiny_cnn"))
    assert plans.uniform_limit == pytest.approx(_kib({n: 3 for n in TINY_CNN_PARAMS}))
    assert plans.excess(plans.cost(_uniform(plans, 3, 8))) == pytest.approx(0.0, abs=1e-9)
    assert plans.excess(plans.cost(_uniform(plans, 4, 2))) > 0
    assert plans.uniform_bits() == [_uniform(plans, 3, 8), _uniform(plans, 2, 8)]


def test_uniform_bops_budget_is_the_bops_of_that_uniform_plan(layers_of):
    space = _space({"_default": [2, 3, 4, 8]}, {"_default": [2, 3, 4, 8]}, budget={"uniform_bops": "W3A3"})
    plans = PlanSpace(space, layers_of("tiny_cnn"))
    m = TINY_CNN_MACS
    # the first layer reads the (float) image: its input counts at 32 bits
    by_hand = (m["features.0.0"] * 3 * 32 + (m["features.1.0"] + m["features.2.0"] + m["head.2"]) * 9) / 1e6
    assert plans.uniform_limit == pytest.approx(by_hand)
    assert plans.excess(plans.cost(_uniform(plans, 3, 3))) == pytest.approx(0.0, abs=1e-9)
    assert plans.excess(plans.cost(_uniform(plans, 4, 3))) > 0
    assert plans.excess(plans.cost(_uniform(plans, 3, 4))) > 0
    assert _uniform(plans, 3, 3) in plans.uniform_bits()


def test_uniform_budget_with_pinned_first_and_last_layers(layers_of):
    """default.yaml's shape: the named uniform plan has the pinned layers at their nearest choice."""
    space = _space(
        {"_default": [2, 3, 4], "_first_last": [4, 8]},
        {"_default": [2, 3, 4], "_first_last": [8]},
        budget={"uniform_bops": "W3A2"},
    )
    plans = PlanSpace(space, layers_of("tiny_cnn"))
    named = {n: LayerBits(3, 2) for n in ("features.1.0", "features.2.0")}
    named |= {n: LayerBits(4, 8) for n in ("features.0.0", "head.2")}
    assert plans.excess(plans.cost(named)) == pytest.approx(0.0, abs=1e-9)
    assert plans.excess(plans.cost({**named, "features.2.0": LayerBits(3, 3)})) > 0
    starts = plans.uniform_bits()
    assert named in starts
    assert all(plans.excess(plans.cost(b)) <= 1e-9 for b in starts)
    assert [b["features.1.0"].w for b in starts] == [3, 2]  # W4 fits at no activation bits; W3 at A2


def test_params_and_bits_round_trip(layers_of):
    space = _space({"_first_last": [8], "_default": [2, 4]}, {"_first_last": [8], "_default": [4, 8]})
    plans = PlanSpace(space, layers_of("tiny_resnet"))
    rng = random.Random(1)
    for _ in range(5):
        bits = {c.name: LayerBits(rng.choice(c.w), rng.choice(c.a)) for c in plans.choices}
        params = plans.params_of(bits)
        assert not any(k.endswith(("stem.0", "head.2")) for k in params)  # single choices are no params
        assert plans.bits_from_params(params) == bits
    top = plans.bits_from_params({})
    assert all(b == LayerBits(c.w[-1], c.a[-1]) for c, b in zip(plans.choices, top.values(), strict=True))


SEARCHED = {
    "bits": {
        "weight": {"_first_last": [8], "_default": [2, 4]},
        "activation": {"_first_last": [8], "block2.shortcut.0": [4], "_default": [4, 8]},
    },
    "budget": {"max_size_kib": 4.5},
    "method": {
        "kind": ["ptq", "ptq+qat"],
        "ptq": {"modcap_k": [0, 1], "recon.iters": 5},
        "qat": {
            "train.iterations": 1000,
            "train.q_lr": {"low": 1e-6, "high": 1e-4, "log": True},
            "sample_loss.lambda_l": {"low": 0.0, "high": 0.4},
        },
    },
}


@pytest.fixture
def searched(layers_of):
    space = parse_space(SEARCHED)
    return PlanSpace(space, layers_of("tiny_resnet"))


def test_space_function_parameters_and_constants(searched):
    fn = SpaceFunction(searched, seed=7)
    middle = [c.name for c in searched.choices if c.name not in ("stem.0", "head.2")]
    searched_knobs = {"kind", "ptq.modcap_k", "qat.train.q_lr", "qat.sample_loss.lambda_l"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    repaired = 0
    for _ in range(6):
        trial = study.ask()
        out = fn(trial)
        expected = {f"w:{n}" for n in middle} | {f"a:{n}" for n in middle if n != "block2.shortcut.0"}
        assert set(trial.params) == expected | searched_knobs
        fixed = {k.name: k.value for k in searched.space.knobs() if k.fixed}
        assert "ptq.recon.iters" in fixed and "qat.preset" in fixed
        assert set(out) == set(fixed) | {"plan", "cost", "feasible", "seed"}
        assert {k: out[k] for k in fixed} == fixed and out["seed"] == 7
        plan, cost, feasible = searched.evaluate(trial.params)
        assert out["plan"] == plan.to_dict() and out["cost"] == cost and out["feasible"] is feasible is True
        assert cost["size_kib"] <= 4.5
        asked = {n: trial.params[f"w:{n}"] for n in middle}
        repaired += any(out["plan"][n]["w"] != w for n, w in asked.items())
        study.tell(trial, 0.0)
    assert repaired, "the budget never binds: the repair is not exercised"


def test_enqueued_warm_starts_give_back_their_plan_and_the_function_pickles(searched):
    from dfq_search.search.campaign import warm_starts

    fn = SpaceFunction(searched, seed=1)
    again = pickle.loads(pickle.dumps(fn))
    starts = list(warm_starts(searched).values())
    assert starts
    study = optuna.create_study()
    knobs = {"kind": "ptq", "ptq.modcap_k": 1, "qat.train.q_lr": 1e-5, "qat.sample_loss.lambda_l": 0.2}
    for bits in starts:
        study.enqueue_trial({**searched.params_of(bits), **knobs})
        study.enqueue_trial({**searched.params_of(bits), **knobs})
    for bits in starts:
        want = {n: {"w": b.w, "a": b.a} for n, b in bits.items()}
        first, second = study.ask(), study.ask()
        out = fn(first)
        assert out["plan"] == want and out["feasible"]
        assert first.params == {**searched.params_of(bits), **knobs}
        assert again(second) == out and second.params == first.params
