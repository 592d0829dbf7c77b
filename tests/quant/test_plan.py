import pytest

from dfq_search.errors import DfqError
from dfq_search.quant.plan import BitPlan, LayerBits, parse_bits

NAMES = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "linear"]


def test_precedence_exact_then_first_regex_then_default():
    plan = BitPlan(
        {
            "_default": {"w": 4, "a": 4},
            "re:layer1\\..*": {"w": 3},
            "re:layer.*": {"w": 2, "a": 6},
            "layer1.0.conv2": {"a": 8},
            "conv1": {"w": 8, "a": 8},
        }
    )
    got = plan.resolve(NAMES)
    assert got["conv1"] == LayerBits(8, 8)
    assert got["layer1.0.conv1"] == LayerBits(3, 6)  # w from the first regex, a from the second
    assert got["layer1.0.conv2"] == LayerBits(3, 8)  # exact a wins; w from the regex
    assert got["layer2.0.conv1"] == LayerBits(2, 6)
    assert got["linear"] == LayerBits(4, 4)


def test_uncovered_layers_stay_float_and_partial_cover_is_refused():
    assert BitPlan({"conv1": {"w": 4, "a": 4}}).resolve(NAMES) == {"conv1": LayerBits(4, 4)}
    with pytest.raises(DfqError, match="has no 'a' bits"):
        BitPlan({"conv1": {"w": 4}}).resolve(NAMES)


def test_unknown_layer_refused_with_suggestion():
    with pytest.raises(DfqError, match="lacks.*did you mean 'layer1.0.conv1'") as err:
        BitPlan({"layer1.0.cnv1": {"w": 4, "a": 4}}).resolve(NAMES)
    assert "layer1.0.cnv1" in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(DfqError, match="pattern matches no layer"):
        BitPlan({"re:block.*": {"w": 4, "a": 4}}).resolve(NAMES)


@pytest.mark.parametrize(
    "rules, match",
    [
        ({"_default": {"w": 7, "a": 4}}, "not allowed.*7.*allowed: \\[2, 3, 4, 5, 6, 8\\]"),
        ({"_default": {"w": 1, "a": 4}}, "not allowed"),
        ({"_default": {"w": True, "a": 4}}, "not allowed"),
        ({"_default": {"w": "4", "a": 4}}, "not allowed"),
        ({"_default": {"wbits": 4, "a": 4}}, "unknown field.*wbits.*w \\(weight bits\\)"),
        ({"_default": 4}, "a mapping with w"),
        ({"re:(": {"w": 4, "a": 4}}, "bad regular expression"),
        (["w", 4], "must be a mapping"),
    ],
)
def test_bad_rules_refused(rules, match):
    with pytest.raises(DfqError, match=match):
        BitPlan(rules)


def test_yaml_round_trip_keeps_order(tmp_path):
    plan = BitPlan({"_default": {"w": 4, "a": 4}, "re:layer.*": {"w": 3}, "conv1": {"w": 8, "a": 8}})
    plan.save(tmp_path / "p.yaml")
    again = BitPlan.load(tmp_path / "p.yaml")
    assert again == plan and list(again.to_dict()) == list(plan.to_dict())


def test_load_errors(tmp_path):
    with pytest.raises(DfqError, match="not found"):
        BitPlan.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("_default: {w: 4, a: [\n")
    with pytest.raises(DfqError, match="not valid YAML"):
        BitPlan.load(bad)


def test_parse_bits():
    assert parse_bits("W4A8") == LayerBits(4, 8) and parse_bits("w2a4") == LayerBits(2, 4)
    with pytest.raises(DfqError, match="WxAy"):
        parse_bits("4/4")
    with pytest.raises(DfqError, match="not allowed"):
        parse_bits("W16A16")


def test_one_matcher_for_plans_and_spaces():
    """rule_chain is the precedence of both: exact name, groups (a space's _first_last), re: rules in
    order, _default; a plan takes each field from the first rule that sets it, a space the first rule."""
    from dfq_search.quant.plan import rule_chain

    rules = {"_default": "d", "re:layer.*": "r1", "re:layer1.*": "r2", "_first_last": "g", "layer1.conv": "x"}
    assert rule_chain(rules, "layer1.conv", ("_first_last",)) == ["x", "g", "r1", "r2", "d"]
    assert rule_chain(rules, "layer1.bn") == ["r1", "r2", "d"]
    assert rule_chain(rules, "fc", ("_first_last",)) == ["g", "d"]
    assert rule_chain({"re:a": 1}, "b") == []
    plan = BitPlan({"_default": {"w": 4, "a": 4}, "re:layer1.*": {"w": 2}, "layer1.conv": {"a": 8}})
    assert plan.resolve(["layer1.conv", "fc"])["layer1.conv"] == LayerBits(2, 8)  # w from re:, a exact
