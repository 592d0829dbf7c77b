"""Knobs: fixed, categorical or a range, their checks, and what they suggest to a real Optuna trial."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from dfq_search.errors import DfqError
from dfq_search.search.knobs import Knob, number, one_of, parse_knob


def _trial():
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()


def test_fixed_knob_is_no_trial_parameter():
    knob = parse_knob("ptq.iters", 5, number("iters", 1, 10, integer=True))
    assert knob == Knob("ptq.iters", (5,)) and knob.fixed and knob.value == 5
    trial = _trial()
    assert knob.suggest(trial) == 5
    assert trial.params == {}
    assert parse_knob("k", [3]).fixed  # a one-element list is fixed too


def test_categorical_knob_suggests_among_its_choices():
    knob = parse_knob("ptq.act_range", ["mse", "minmax"], one_of("act_range", ("minmax", "mse")))
    assert not knob.fixed and knob.values() == ("mse", "minmax")
    trial = _trial()
    value = knob.suggest(trial)
    assert value in ("mse", "minmax") and trial.params == {"ptq.act_range": value}
    assert trial.distributions["ptq.act_range"] == CategoricalDistribution(["mse", "minmax"])


def test_float_range_with_log_scale():
    knob = parse_knob("qat.q_lr", {"low": 1e-6, "high": "1e-4", "log": True}, number("q_lr", 0, 1))
    assert (knob.low, knob.high, knob.log, knob.integer) == (1e-6, 1e-4, True, False)
    assert not knob.fixed and knob.values() == (1e-6, 1e-4)
    trial = _trial()
    assert 1e-6 <= knob.suggest(trial) <= 1e-4
    assert trial.distributions["qat.q_lr"] == FloatDistribution(1e-6, 1e-4, log=True)


def test_int_range_includes_both_ends():
    knob = parse_knob("ptq.modcap_k", {"low": 0, "high": 3, "int": True}, number("k", 0, 64, integer=True))
    trial = _trial()
    assert isinstance(knob.suggest(trial), int)
    assert trial.distributions["ptq.modcap_k"] == IntDistribution(0, 3)
    degenerate = parse_knob("x", {"low": 2, "high": 2})
    assert not degenerate.fixed and degenerate.suggest(_trial()) == 2.0


def test_range_mistakes():
    with pytest.raises(DfqError, match="numbers with low <= high"):
        parse_knob("x", {"low": 2, "high": 1})
    with pytest.raises(DfqError, match="low > 0 on a log scale"):
        parse_knob("x", {"low": -1.0, "high": 1.0, "log": True})
    with pytest.raises(DfqError, match=r"did you mean 'log'"):
        parse_knob("x", {"low": 1, "high": 2, "lg": True})
    with pytest.raises(DfqError, match="low and high"):
        parse_knob("x", {"high": 2})
    with pytest.raises(DfqError, match="numbers with low <= high"):
        parse_knob("x", {"low": "a", "high": "b"})
    with pytest.raises(DfqError, match=r"got 9; a number in \[0, 1\]"):
        parse_knob("x", {"low": 0, "high": 9}, number("x", 0, 1))  # the check applies to both ends


def test_choice_mistakes():
    with pytest.raises(DfqError, match="distinct values"):
        parse_knob("x", [1, 2, 1])
    with pytest.raises(DfqError, match="at least one value"):
        parse_knob("x", [])
    assert parse_knob("x", [1, 1.5]).choices == (1, 1.5)


def test_one_of_tells_bools_from_ints():
    check = one_of("k", (0, 1))
    assert check(1) == 1
    with pytest.raises(DfqError, match=r"k: got True; one of \[0, 1\]"):
        check(True)  # True == 1 in Python; refused all the same
    flag = one_of("repair", (True, False))
    assert flag(False) is False
    with pytest.raises(DfqError):
        flag(0)
    with pytest.raises(DfqError, match="pick one of"):
        one_of("m", ("kl", "top1"))("kll")


def test_number_checks():
    check = number("lr", 0.0, 1.0)
    assert check("1e-3") == pytest.approx(1e-3)  # PyYAML reads 1e-3 as a string
    assert check(1) == 1
    for bad in (True, -0.1, 1.5, "abc", None):
        with pytest.raises(DfqError, match=r"a number in \[0.0, 1.0\]"):
            check(bad)
    ints = number("iters", 1, 10, integer=True)
    assert ints(10) == 10
    with pytest.raises(DfqError, match="an int"):
        ints(2.0)
