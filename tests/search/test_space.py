"""Search-space files: the shipped ones resolve against their models; every mistake is a clear DfqError."""

from __future__ import annotations

import copy
import re

import pytest

from dfq_search.errors import DfqError
from dfq_search.models import create_model
from dfq_search.quant import trace_layers
from dfq_search.search.campaign import _check_modcap
from dfq_search.search.define import PlanSpace
from dfq_search.search.space import SPACE_DIR, load_space, parse_space
from dfq_search.synth.direct import DirectConfig

SHIPPED = sorted(SPACE_DIR.glob("*.yaml"))
BASE = {"bits": {"weight": {"_default": [2, 4]}, "activation": {"_default": [8]}}}


def _space(**sections):
    """A space of ``sections``; a fine-tuning one given a trial length (the space must say it) unless
    it says one."""
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(sections))
    method = data.get("method", {})
    kinds = method.get("kind", "ptq")
    if "qat" in str(kinds) and isinstance(method.get("qat", {}), dict):
        method["qat"] = {"train.iterations": 1000, **method.get("qat", {})}  # the presets warm up 800
    return parse_space(data)


def _refused(match: str, **sections) -> DfqError:
    with pytest.raises(DfqError) as info:
        _space(**sections)
    assert re.search(match, str(info.value)), str(info.value)
    return info.value


def _raw(name: str) -> dict:
    import yaml

    return yaml.safe_load((SPACE_DIR / f"{name}.yaml").read_text())


def test_the_documented_spaces_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"default", "cifar_resnet20", "tiny_smoke"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_space_resolves_against_its_model(path, shared_cache, monkeypatch):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(shared_cache))  # default.yaml's digits_cnn trains once
    space = load_space(path)
    assert load_space(path.stem) == space  # by shipped name too
    assert space.source == str(path)
    bundle = create_model(space.model.name)
    example = bundle.preprocess.example_input()
    plans = PlanSpace(space, trace_layers(bundle.model, example))
    assert plans.choices
    _check_modcap(space, bundle, example)
    assert plans.uniform_bits(), "no uniform plan fits the shipped budget"


def test_modcap_k_larger_than_the_model_allows_is_refused_before_compute():
    space = load_space("tiny_smoke")
    bundle = create_model("tiny_resnet")
    bad = parse_space({**_raw("tiny_smoke"), "method": {"kind": "ptq", "ptq": {"modcap_k": [0, 2]}}})
    example = bundle.preprocess.example_input()
    _check_modcap(space, bundle, example)
    with pytest.raises(DfqError, match=r"modcap_k too large for tiny_resnet.*\[0, 2\]"):
        _check_modcap(bad, bundle, example)
    qat_only = parse_space(
        {**_raw("tiny_smoke"), "method": {"kind": "qat", "qat": {"train.iterations": 900}}}
    )
    _check_modcap(qat_only, bundle, example)  # no PTQ, nothing to check


def test_defaults_and_knob_order():
    space = _space()
    assert space.budget.kinds == () and space.budget.repair
    assert space.search.warm_start == ("uniform", "sensitivity")
    assert [k.name for k in space.knobs()] == ["kind"]  # no knob given: every setting is its config's
    both = _space(method={"kind": ["ptq", "qat"], "ptq": {"recon.iters": 5, "modcap_k": [0, 1]},
                          "qat": {"train.q_lr": 1e-4}})  # fmt: skip
    names = [
        "kind",
        "ptq.recon.iters",
        "ptq.modcap_k",
        "qat.train.iterations",
        "qat.train.q_lr",
        "qat.preset",
    ]
    assert [k.name for k in both.knobs()] == names  # <part>.<path in its config>, in the file's order
    assert both.qat["preset"].value == "adadfq"
    assert not both.kind.fixed
    qat = _space(method={"kind": "qat"})
    assert not any(k.name.startswith("ptq.") for k in qat.knobs())


def test_a_fine_tuning_space_says_how_long_a_trial_fine_tunes():
    """The presets' lengths are the papers' 80,000 steps: a search that did not say would run them."""
    with pytest.raises(DfqError, match=r"method.qat without train.iterations: got \{'gdfq': 80000"):
        parse_space({**BASE, "method": {"kind": ["ptq", "ptq+qat"], "qat": {"preset": "gdfq"}}})
    assert _space(method={"kind": "qat"}).qat["train.iterations"].value == 1000


def test_numbers_written_as_yaml_strings_are_read_as_numbers():
    space = _space(method={"qat": {"train.q_lr": "1e-3"}, "kind": "qat"})
    assert space.qat["train.q_lr"].value == pytest.approx(1e-3)
    space = _space(search={"warm_start": "uniform"})
    assert space.search.warm_start == ("uniform",)


@pytest.mark.parametrize(
    ("sections", "bad", "hint"),
    [
        ({"budgett": {"max_size_kib": 3}}, "budgett", "budget"),
        ({"budget": {"max_size_kb": 3}}, "max_size_kb", "max_size_kib"),
        ({"method": {"ptq": {"modcap_kk": 1}}}, "modcap_kk", "modcap_k"),
        ({"method": {"kind": "qat", "qat": {"sample_loss.lamda_u": 0.9}}}, "lamda_u", "lambda_u"),
        ({"method": {"ptq": {"recon.iter": 9}}}, "iter", "iters"),
        ({"method": {"knd": "ptq"}}, "knd", "kind"),
        ({"samples": {"calibraton": 3}}, "calibraton", "calibration"),
        ({"objective": {"metrc": "kl"}}, "metrc", "metric"),
        ({"search": {"trails": 3}}, "trails", "trials"),
        ({"resources": {"trial_cpus": 1}}, "trial_cpus", "trial_cpu"),
        ({"model": {"nam": "tiny_cnn"}}, "nam", "name"),
        ({"method": {"kind": "qat", "qat": {"train.q_lr": {"low": 0.0, "hi": 1.0}}}}, "hi", "high"),
    ],
)
def test_unknown_keys_are_refused_with_a_suggestion(sections, bad, hint):
    err = _refused(f"got '{bad}'", **sections)
    assert f"did you mean '{hint}'" in str(err)


def test_unknown_bits_key_and_missing_rules():
    with pytest.raises(DfqError, match="did you mean 'weight'"):
        parse_space({"bits": {"weights": {"_default": [2]}, "activation": {"_default": [8]}}})
    with pytest.raises(DfqError, match="both weight and activation"):
        parse_space({"bits": {"weight": {"_default": [2]}}})
    with pytest.raises(DfqError, match="a mapping of rules"):
        parse_space({"bits": {"weight": [2, 4], "activation": {"_default": [8]}}})
    with pytest.raises(DfqError, match="YAML mapping"):
        parse_space([1, 2])


@pytest.mark.parametrize(
    ("part", "bits", "bad"),
    [("weight", [2, 7], "7"), ("weight", 1, "1"), ("activation", [16], "16"), ("weight", [True], "True")],
)
def test_bits_outside_the_allowed_widths_are_refused(part, bits, bad):
    data = copy.deepcopy(BASE)
    data["bits"][part]["_default"] = bits
    with pytest.raises(DfqError, match=rf"bits\.{part} bits: got {bad}; one of \[2, 3, 4, 5, 6, 8\]"):
        parse_space(data)


def test_repeated_and_empty_choices_are_refused():
    data = copy.deepcopy(BASE)
    data["bits"]["weight"]["_default"] = [2, 4, 2]
    with pytest.raises(DfqError, match=r"got \[2, 4, 2\]; distinct values"):
        parse_space(data)
    data["bits"]["weight"]["_default"] = []
    with pytest.raises(DfqError, match="at least one value"):
        parse_space(data)
    _refused(
        r"choices of 'ptq.act_range': got \['mse', 'mse'\]", method={"ptq": {"act_range": ["mse", "mse"]}}
    )
    _refused(r"choices of 'ptq.act_range': got \[\]", method={"ptq": {"act_range": []}})


def test_bad_ranges_are_refused():
    _refused(
        r"range of 'qat.train.q_lr'.*'low': 0.001.*low <= high",
        method={"kind": "qat", "qat": {"train.q_lr": {"low": 1e-3, "high": 1e-4}}},
    )
    _refused(
        r"log range of 'qat.train.q_lr'.*low > 0",
        method={"kind": "qat", "qat": {"train.q_lr": {"low": 0.0, "high": 1e-4, "log": True}}},
    )
    _refused(
        r"range of 'qat.train.q_lr'.*low and high",
        method={"kind": "qat", "qat": {"train.q_lr": {"low": 0.0}}},
    )
    _refused(r"method.qat: train.q_lr.*got -1.0",
             method={"kind": "qat", "qat": {"train.q_lr": {"low": -1.0, "high": 0.1}}})  # fmt: skip
    _refused(r"method.ptq: act_range.*got 1", method={"ptq": {"act_range": {"low": 1, "high": 2}}})
    _refused(r"method.ptq: iters.*got 2.5; a positive int", method={"ptq": {"recon.iters": 2.5}})


def test_every_value_a_knob_can_take_builds_a_valid_config():
    """Validation builds the configs at every choice and both ends of every range: the configs' own
    checks, with no second list of allowed values or second default in the space."""

    def qat(**knobs):
        return {"kind": "qat", "qat": knobs}

    err = _refused(r"margin bounds.*got \(0.7, 0.6\)",
                   method=qat(**{"sample_loss.lambda_l": {"low": 0.0, "high": 0.7},
                                 "sample_loss.lambda_u": {"low": 0.6, "high": 1.0}}))  # fmt: skip
    assert "Fix:" in str(err) and "at {" in str(err)
    # a bound not given is the preset's (adadfq: lambda_u 0.8)
    _refused(
        r"margin bounds.*got \(0.9, 0.8\)", method=qat(**{"sample_loss.lambda_l": {"low": 0.0, "high": 0.9}})
    )
    _refused(r"qdrop.*got 1.0", method={"ptq": {"recon.qdrop": {"low": 0.0, "high": 1.0}}})  # [0, 1) only
    _refused(r"train.warmup.*0 <= warmup < iterations", method=qat(**{"train.iterations": [5, 100],
                                                                         "train.warmup": 50}))  # fmt: skip
    _refused(r"unknown sample source.*'lrqq'", method=qat(**{"source.name": ["gdfq", "lrqq"]}))
    ok = _space(method=qat(**{"sample_loss.lambda_l": {"low": 0.0, "high": 0.4},
                              "sample_loss.lambda_u": {"low": 0.6, "high": 1.0}}))  # fmt: skip
    assert ok.qat["sample_loss.lambda_l"].values() == (0.0, 0.4)
    assert _space(method={"ptq": {"recon.iters": {"low": 10, "high": 20, "int": True}}}).ptq[
        "recon.iters"
    ].values() == (10, 20)


@pytest.mark.parametrize("path", ["sample_loss.lambda_l", "sample_loss.lambda_u"])
def test_a_knob_the_preset_would_ignore_is_refused_with_the_reason(path):
    """gdfq's sample loss has no margin term: its bounds used to be dropped silently."""
    value = 0.9 if path.endswith("lambda_u") else 0.1
    err = _refused(rf"method.qat.{path} with preset 'gdfq'.*read by the margin term.*every configuration",
                   method={"kind": "qat", "qat": {"preset": "gdfq", path: value}})  # fmt: skip
    assert "bns, ce" in str(err)
    _space(method={"kind": "qat", "qat": {"preset": ["adadfq", "gdfq"], path: value}})  # adadfq reads it
    for preset in ("adadfq", "adasg"):  # both have the margin term
        _space(method={"kind": "qat", "qat": {"preset": preset, path: value}})
    _refused(
        r"q_loss.dkd_beta with preset 'adadfq'.*dkd", method={"kind": "qat", "qat": {"q_loss.dkd_beta": 2.0}}
    )
    # a term's weight is read whatever the preset: a weight for a term the preset lacks adds the term
    added = _space(method={"kind": "qat", "qat": {"preset": "gdfq", "sample_loss.weights.agree": 0.1}})
    assert added.qat["sample_loss.weights.agree"].value == 0.1


def test_a_ptq_knob_no_configuration_reads_is_refused():
    """PTQConfig.ignored: percentile without percentile ranges, ModCap's settings at modcap_k 0, the
    reconstruction's settings without reconstruction; read by some configuration: kept."""
    _refused(
        r"method.ptq.percentile.*act_range percentile only",
        method={"ptq": {"act_range": "mse", "percentile": 99.9}},
    )
    _refused(r"method.ptq.capacity.*ModCap only", method={"ptq": {"capacity": ["data", "free"]}})
    _refused(
        r"method.ptq.recon.iters.*reconstruct is false",
        method={"ptq": {"reconstruct": False, "recon.iters": 5}},
    )
    _refused(
        r"method.ptq.stride_factor.*data-free capacity", method={"ptq": {"modcap_k": 1, "stride_factor": 0.4}}
    )
    _space(method={"ptq": {"act_range": ["mse", "percentile"], "percentile": 99.9}})
    _space(method={"ptq": {"modcap_k": [0, 1], "capacity": ["data", "free"], "stride_factor": 0.4}})


@pytest.mark.parametrize(
    ("part", "old", "new"),
    [("ptq", "iters", "recon.iters"), ("ptq", "qdrop", "recon.qdrop"), ("qat", "steps", "train.iterations"),
     ("qat", "lambda_l", "sample_loss.lambda_l"), ("qat", "generator", "source.name"),
     ("qat", "bns", "sample_loss.weights.bns")],
)  # fmt: skip
def test_a_knob_by_its_old_short_name_is_refused_with_its_path(part, old, new):
    err = _refused(rf"method.{part}.{old} is now method.{part}.{new}",
                   method={"kind": "ptq+qat", part: {old: 1}})  # fmt: skip
    assert f"rename {old} to {new}" in err.fix


def test_the_seeds_the_campaign_sets_are_not_knobs():
    _refused(r"method.ptq.recon.seed.*campaign sets", method={"ptq": {"recon.seed": 3}})
    _refused(r"method.qat.train.seed.*campaign sets", method={"kind": "qat", "qat": {"train.seed": 3}})


def test_knobs_of_a_method_no_kind_runs_are_refused():
    _refused(r"method.qat knobs with method.kind \['ptq'\].*no trial would use them",
             method={"qat": {"train.q_lr": 1e-3}})  # fmt: skip
    _refused(
        r"method.ptq knobs with method.kind \['qat'\]", method={"kind": "qat", "ptq": {"recon.iters": 5}}
    )
    _space(method={"kind": ["ptq", "qat"], "ptq": {"recon.iters": 5}, "qat": {"train.q_lr": 1e-3}})


def test_a_samples_key_the_source_would_ignore_is_refused():
    _refused(r"samples.direct with samples.source gaussian.*only with samples.source: direct",
             samples={"source": "gaussian", "direct": {"iterations": 5}})  # fmt: skip
    _refused(r"samples.generators with samples.source direct", samples={"generators": ["gdfq"]})
    _refused(r"resources.worker_gpu with samples.source direct", resources={"worker_gpu": 1})
    _refused(r"samples.bank with samples.source direct", samples={"bank": "b"})
    gen = {"source": "generator", "generators": ["gdfq"], "keep_after": 3}
    _space(samples=gen, resources={"worker_gpu": 1})
    _space(samples={"source": "direct", "direct": {"iterations": 5}})


def test_direct_synthesis_settings_are_the_synthesizers_own():
    space = _space(samples={"direct": {"iterations": 7, "bn_relative": True, "lr": 1}})
    assert (space.samples.direct.iterations, space.samples.direct.bn_relative) == (7, True)
    assert space.samples.direct.jitter == DirectConfig().jitter  # the rest: DirectConfig's defaults
    assert _space().samples.direct == DirectConfig()
    _refused(r"samples.iterations is now samples.direct.iterations", samples={"iterations": 50})
    _refused(r"samples.direct.mean.*set from the model's preprocessing", samples={"direct": {"mean": [0.5]}})
    _refused(r"samples.direct.itrations.*not a setting", samples={"direct": {"itrations": 5}})
    _refused(r"direct synthesis iterations.*an int >= 1", samples={"direct": {"iterations": 0}})
    _refused(r"direct synthesis bn_relative.*true or false", samples={"direct": {"bn_relative": "yes"}})
    _refused(r"samples.direct.*a mapping", samples={"direct": 100})


def test_cmaes_is_refused_with_the_reason():
    """CMA-ES would sample every (categorical) bit width at random: it used to run a random sampler."""
    err = _refused(r"search.sampler 'cmaes' cannot search.*categorical", search={"sampler": "cmaes"})
    assert "tpe" in err.fix
    _refused(r"unknown sampler.*tpe", search={"sampler": "cma"})


def test_a_setting_no_knob_sets_is_its_configs():
    """One default per setting: the trial's configs are the configs' defaults (ReconConfig: 300 steps)
    and the preset's, under the knobs given."""
    from dfq_search.ptq import PTQConfig
    from dfq_search.qat import load_config
    from dfq_search.search.method import game_config, ptq_config

    space = _space(method={"kind": ["ptq", "qat"]})
    assert space.ptq == {} and list(space.qat) == ["train.iterations", "preset"]  # the length: _space's
    assert ptq_config({}) == PTQConfig() and PTQConfig().recon.iters == 300
    assert game_config({"preset": "adasg"}).sample_loss == load_config("adasg").sample_loss


def test_budget_checks():
    both = _space(budget={"max_size_kib": 3, "mean_weight_bits": 3}).budget
    assert both.kinds == ("mean_weight_bits", "max_size_kib")
    _refused(r"budget.uniform_weight_bits: got 7", budget={"uniform_weight_bits": 7})
    _refused(r"got 'W3'; the form WxAy", budget={"uniform_bops": "W3"})
    _refused(r"budget.repair: got 'yes'", budget={"repair": "yes"})
    _refused(r"budget.max_size_kib: got -1", budget={"max_size_kib": -1})
    assert _space(budget={"uniform_bops": "w3a2"}).budget.uniform_bops == "W3A2"
    assert _space(budget={"max_mbops": 5, "repair": False}).budget.kinds == ("max_mbops",)


def test_search_and_samples_checks():
    err = _refused(r"unknown sampler \(did you mean 'tpe'\?\): got 'tpee'", search={"sampler": "tpee"})
    assert "nsga2" in str(err)
    _refused(
        r"unknown warm start \(did you mean 'sensitivity'\?\): got 'sensitivty'",
        search={"warm_start": ["uniform", "sensitivty"]},
    )
    _refused(r"samples.bank: got None; a bank URI", samples={"source": "bank"})
    assert _space(samples={"source": "bank", "bank": "/tmp/b"}).samples.bank == "/tmp/b"
    _refused(r"samples.source: got 'gauss'", samples={"source": "gauss"})
    _refused(r"method.kind: got 'qta'", method={"kind": "qta"})
    _refused(r"objective.reports: got 0", objective={"reports": 0})
    _refused(r"section 'search': got \[1\]", search=[1])


def test_a_malformed_yaml_file_is_refused(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("bits:\n  weight: {_default: [2, 4]\n  activation: x\n")
    with pytest.raises(DfqError, match=rf"not valid YAML: got '{re.escape(str(path))}'"):
        load_space(path)


def test_a_space_file_is_read(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "bits:\n  weight: {_default: [2, 4]}\n  activation: {_default: [8]}\nbudget: {max_size_kib: 2}\n"
    )
    space = load_space(path)
    assert space.weight_bits == {"_default": (2, 4)} and space.budget.max_size_kib == 2
    assert space.source == str(path)


def test_an_unknown_shipped_name_lists_the_shipped_ones():
    with pytest.raises(DfqError) as info:
        load_space("tiny_smok")
    msg = str(info.value)
    assert "did you mean 'tiny_smoke'" in msg
    for path in SHIPPED:
        assert path.stem in msg
