"""Presets match ALGORITHMS.md, every value can be overridden, unknown keys are refused helpfully."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.qat import PRESETS, TensorBoardReporter, load_config


def test_presets_carry_the_published_values() -> None:
    ada = load_config("adadfq")
    assert ada.sample_loss.weights == {"margin": 1.0, "disagree": 0.2, "agree": 0.1, "bns": 1.0}
    assert (ada.sample_loss.lambda_l, ada.sample_loss.lambda_u) == (0.1, 0.8)
    assert ada.q_loss.weights == {"entropy": 1.0} and ada.q_loss.temperature == 20.0
    assert (ada.train.batch_size, ada.train.q_lr, ada.train.q_momentum, ada.train.q_weight_decay) == (
        16, 1e-4, 0.9, 1e-4)  # fmt: skip
    assert ada.train.q_nesterov and (ada.train.warmup, ada.train.iterations) == (800, 80000)
    assert ada.source.lr == 1e-3 and ada.source.betas == [0.5, 0.999]
    gdfq = load_config("gdfq")
    assert gdfq.sample_loss.weights == {"ce": 1.0, "bns": 0.1}
    assert gdfq.q_loss.weights == {"kd": 1.0, "ce": 1.0} and gdfq.q_loss.temperature == 20.0
    dsg = load_config("dsg")
    assert dsg.sample_loss.weights == {"ce": 1.0, "lse": 0.1, "sci": 1.0} and dsg.sample_loss.slack_eps == 0.9
    lrq = load_config("lrq")
    assert lrq.source.name == "lrq" and "ama" in lrq.sample_loss.weights
    assert lrq.q_loss.weights["dkd"] == 1.0
    assert (lrq.q_loss.dkd_alpha, lrq.q_loss.dkd_beta, lrq.q_loss.dkd_temperature) == (1.0, 8.0, 4.0)
    assert "agree" not in load_config("adasg").sample_loss.weights
    assert set(PRESETS) == {"gdfq", "dsg", "adasg", "adadfq", "lrq"}


def test_overrides_dotted_and_nested(tmp_path) -> None:
    cfg = load_config("adadfq", ["train.iterations=300", "sample_loss.lambda_l=0.3", "source.name=lrq"])
    assert (cfg.train.iterations, cfg.sample_loss.lambda_l, cfg.source.name) == (300, 0.3, "lrq")
    cfg = load_config("gdfq", {"sample_loss": {"weights": {"ce": 1.0}}})
    assert cfg.sample_loss.weights == {"ce": 1.0}  # weights are replaced, not merged
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  batch_size: 7\n")
    assert load_config(path).train.batch_size == 7
    assert load_config(None).train.batch_size == 32


def test_a_dotted_path_sets_one_setting_and_a_nested_weights_mapping_all() -> None:
    """``sample_loss.weights.bns`` (a --set string or a search knob's path) sets that term's weight and
    keeps the preset's other terms; it used to replace the whole mapping, dropping them silently."""
    own = load_config("adadfq").sample_loss.weights
    assert load_config("adadfq", ["sample_loss.weights.bns=0.5"]).sample_loss.weights == {**own, "bns": 0.5}
    by_path = load_config("adadfq", paths={"sample_loss.weights.bns": 0.5, "train.q_lr": 1e-5})
    assert by_path.sample_loss.weights == {**own, "bns": 0.5} and by_path.train.q_lr == 1e-5
    with pytest.raises(DfqError, match="did you mean 'iterations'"):
        load_config("adadfq", paths={"train.iteration": 5})


def test_ignored_by_names_the_term_that_would_read_a_knob() -> None:
    from dfq_search.qat.config import ignored_by

    gdfq, ada = load_config("gdfq"), load_config("adadfq")
    assert (
        "margin" in ignored_by(gdfq, "sample_loss.lambda_l")
        and ignored_by(ada, "sample_loss.lambda_l") is None
    )
    assert "dkd" in ignored_by(ada, "q_loss.dkd_beta") and ignored_by(gdfq, "q_loss.temperature") is None
    assert ignored_by(gdfq, "sample_loss.weights.agree") is None  # a weight adds its term
    assert ignored_by(gdfq, "train.q_lr") is None


def test_check_config_refuses_what_the_game_would_refuse_without_a_model() -> None:
    from dfq_search.qat.game import check_config

    for preset in PRESETS:
        check_config(load_config(preset))
    with pytest.raises(DfqError, match="margin bounds"):
        check_config(load_config("adadfq", paths={"sample_loss.lambda_l": 0.9}))
    with pytest.raises(DfqError, match="unknown sample loss"):
        check_config(load_config("gdfq", paths={"sample_loss.weights.cee": 1.0}))
    with pytest.raises(DfqError, match="sample source"):
        check_config(load_config("gdfq", paths={"source.name": "gan"}))
    with pytest.raises(DfqError, match="warmup"):
        check_config(load_config("gdfq", paths={"train.warmup": 80000}))


@pytest.mark.parametrize(
    ("preset", "over", "match"),
    [
        ("adadfq", ["train.iteratons=5"], "did you mean 'iterations'"),
        ("adadfq", ["sampel_loss.use_std=true"], "did you mean 'sample_loss'"),
        ("adadfq", ["train.batch_size=big"], "batch_size"),
        ("adadfq", ["train.batch_size"], "key=value"),
        ("adadfg", None, "did you mean 'adadfq'"),
    ],
)
def test_bad_config(preset, over, match) -> None:
    with pytest.raises(DfqError, match=match):
        load_config(preset, over)


def test_import_stays_lean() -> None:
    code = "import sys, dfq_search.qat, dfq_search.synth.objective; " \
           "print(any(m.split('.')[0] in ('tensorboard', 'ray') for m in sys.modules))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tensorboard_reporter_writes(tmp_path) -> None:
    rep = TensorBoardReporter(str(tmp_path), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rep.scalars(1, {"q/loss": 1.5})
    rep.images(1, "samples", torch.randn(4, 3, 8, 8))
    rep.close()
    assert any(p.name.startswith("events.out.tfevents") and p.stat().st_size > 0 for p in tmp_path.iterdir())
