"""One trial in-process (no Ray): its reports, its checkpoint, infeasible plans and failures."""

from __future__ import annotations

import math
import shutil

import optuna
import pytest
import torch
import yaml

from dfq_search.checkpoint import load_quantized
from dfq_search.models import create_model
from dfq_search.quant import trace_layers
from dfq_search.search.define import PlanSpace, SpaceFunction
from dfq_search.search.objective import FidelityScorer
from dfq_search.search.space import SPACE_DIR, parse_space
from dfq_search.search.trial import INFEASIBLE_SCORE, TrialContext, TrialFailed, _marks, knobs_of, run_trial

QAT = {"train.iterations": 6, "train.warmup": 2, "train.batch_size": 8}
DISTILL = {"steps": 6, "batch_size": 8, "check_every": 2, "lr": [1e-4, 1e-3]}


@pytest.fixture(scope="module")
def tiny(with_running_stats):
    bundle = create_model("tiny_resnet")
    with_running_stats(bundle.model, bundle.preprocess.shape)
    with torch.no_grad():
        bundle.model.head[-1].weight.mul_(20.0)  # confident logits: quantization shows in the KL
    return bundle


def _ctx(tiny, reports=3, scorer=None):
    gen = torch.Generator().manual_seed(0)
    calib = torch.randn(32, *tiny.preprocess.shape, generator=gen)
    heldout = torch.randn(24, *tiny.preprocess.shape, generator=gen)
    return TrialContext(
        tiny.model,
        "tiny_resnet",
        tiny.num_classes,
        tiny.preprocess.shape,
        calib,
        scorer or FidelityScorer(tiny.model, heldout),
        reports=reports,
        eval_fraction=0.5,
    )


def _config(tiny, kind="ptq", seed=0, **budget):
    raw = yaml.safe_load((SPACE_DIR / "tiny_smoke.yaml").read_text())
    raw["method"] = {"kind": kind, "ptq": raw["method"]["ptq"], "qat": QAT, "distill": DISTILL}
    for part in ("ptq", "qat", "distill"):
        if part not in kind:  # knobs of a method no kind runs are refused
            del raw["method"][part]
    if budget:
        raw["budget"] = budget
    layers = trace_layers(tiny.model, tiny.preprocess.example_input())
    fn = SpaceFunction(PlanSpace(parse_space(raw), layers), seed=seed)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    out = fn(trial)
    return {**trial.params, **out}


class Recorder:
    """A report function that reloads the final checkpoint while its folder still exists."""

    def __init__(self):
        self.calls, self.reloaded = [], None

    def __call__(self, metrics, folder):
        self.calls.append((dict(metrics), folder))
        if folder is not None:
            self.reloaded = load_quantized(folder / "model.pt")


def test_a_ptq_trial_reports_and_leaves_a_checkpoint(tiny):
    ctx = _ctx(tiny)
    config = _config(tiny)
    assert config["kind"] == "ptq" and config["feasible"] and "ptq.modcap_k" in config
    report = Recorder()
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    final = run_trial(config, ctx, report)
    assert [m["fidelity"] for m, _ in report.calls] == [1, 2, 3]
    assert [f is None for _, f in report.calls] == [True, True, False]
    assert [m["n_scored"] for m, _ in report.calls] == [12, 12, 24]  # eval_fraction, then all
    assert report.calls[-1][0] == final
    assert final["size_kib"] == config["cost"]["size_kib"] and final["feasible"] and final["kind"] == "ptq"
    assert all(math.isfinite(m["score"]) and m["kl"] > 0 for m, _ in report.calls)
    assert "oscillation" in final and final["seconds"] > 0
    q, meta = report.reloaded
    assert meta["plan"].to_dict() == config["plan"] and meta["model"] == "tiny_resnet"
    assert ctx.scorer(q)["score"] == pytest.approx(final["score"], rel=1e-5, abs=1e-7)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())  # P untouched


def test_a_ptq_trial_guards_its_reconstruction_on_the_held_out_images(tiny, monkeypatch):
    import dfq_search.ptq.pipeline as pipeline

    seen, real = [], pipeline.guard

    def forced(p, rtn, reconstructed, images):  # the real comparison, then RTN kept whatever it says
        seen.append(images)
        return {**real(p, rtn, reconstructed, images), "kept": "rtn"}

    monkeypatch.setattr(pipeline, "guard", forced)
    config = _config(tiny)
    assert "guard_kept" not in run_trial(config, _ctx(tiny), Recorder())  # no held-out images: no guard
    assert seen == []
    ctx = _ctx(tiny)
    ctx.heldout = ctx.scorer.images
    final = run_trial(config, ctx, Recorder())
    assert final["guard_kept"] == "rtn" and len(seen) == 1 and seen[0] is ctx.heldout


def test_a_repeated_config_is_replayed_from_the_memo_without_compute(tiny, tmp_path, monkeypatch):
    ctx = _ctx(tiny)
    ctx.memo = str(tmp_path / "memo")
    config = _config(tiny)
    first = Recorder()
    final = run_trial(config, ctx, first)
    assert "replayed" not in final and len(list((tmp_path / "memo").iterdir())) == 1

    def no_compute(*_a, **_k):
        raise AssertionError("a replayed trial must not quantize anything")

    monkeypatch.setattr("dfq_search.ptq.run_ptq", no_compute)
    again = Recorder()
    replayed = run_trial(dict(config), ctx, again)
    assert replayed["replayed"] == 1.0 and replayed["score"] == final["score"]
    assert [m["fidelity"] for m, _ in again.calls] == [1, 2, 3]
    assert again.reloaded[0].state_dict().keys() == first.reloaded[0].state_dict().keys()
    assert ctx.scorer(again.reloaded[0])["score"] == pytest.approx(final["score"], rel=1e-5, abs=1e-7)
    other = Recorder()  # another seed is another config: computed
    with pytest.raises(AssertionError, match="must not quantize"):
        run_trial({**config, "seed": 1}, ctx, other)


def test_a_trial_restarted_from_its_final_checkpoint_reports_it_again_without_compute(
    tiny, tmp_path, monkeypatch
):
    config, kept = _config(tiny), tmp_path / "checkpoint"

    def keep(metrics, folder):  # what Tune keeps of the final report, and restores
        if folder is not None:
            shutil.copytree(folder, kept)

    final = run_trial(config, _ctx(tiny), keep)

    def no_compute(*_a, **_k):
        raise AssertionError("a finished trial must not quantize anything")

    monkeypatch.setattr("dfq_search.ptq.run_ptq", no_compute)
    again = Recorder()
    replayed = run_trial(dict(config), _ctx(tiny), again, restored=kept)
    assert [(m["fidelity"], f) for m, f in again.calls] == [(3, kept)]  # the final report only, once
    assert replayed == again.calls[0][0] and replayed["replayed"] == 1.0
    assert {k: v for k, v in replayed.items() if k not in ("replayed", "seconds")} == {
        k: v for k, v in final.items() if k != "seconds"
    }
    (kept / "metrics.json").unlink()  # a checkpoint without its metrics: the trial runs again
    with pytest.raises(AssertionError, match="must not quantize"):
        run_trial(dict(config), _ctx(tiny), Recorder(), restored=kept)


@pytest.mark.parametrize("reports", [1, 5])
def test_ptq_reports_as_many_times_as_asked(tiny, reports):
    ctx = _ctx(tiny, reports=reports)
    report = Recorder()
    run_trial(_config(tiny), ctx, report)
    assert [m["fidelity"] for m, _ in report.calls] == list(range(1, reports + 1))
    assert report.reloaded is not None and report.calls[-1][1] is not None


@pytest.mark.parametrize("kind", ["qat", "ptq+qat"])
def test_fine_tuning_trials_report_ctx_reports_times(tiny, kind):
    ctx = _ctx(tiny)
    config = _config(tiny, kind=kind)
    assert knobs_of(config, "qat") | QAT == knobs_of(config, "qat")
    report = Recorder()
    final = run_trial(config, ctx, report)
    assert [m["fidelity"] for m, _ in report.calls] == [1, 2, 3]
    assert final["kind"] == kind and math.isfinite(final["score"])
    q, meta = report.reloaded
    assert meta["plan"].to_dict() == config["plan"]
    assert ctx.scorer(q)["score"] == pytest.approx(final["score"], rel=1e-5, abs=1e-7)


def test_a_distill_trial_reports_and_ends_in_its_most_faithful_state(tiny, monkeypatch):
    import importlib

    distill_mod = importlib.import_module("dfq_search.qat.distill")  # the package exports the function
    ctx, config = _ctx(tiny), _config(tiny, kind="ptq+distill")
    ctx.heldout = torch.randn(16, *tiny.preprocess.shape, generator=torch.Generator().manual_seed(1))
    assert config["distill.lr"] in (1e-4, 1e-3) and config["distill.steps"] == 6  # searched, fixed
    kept = []
    real_offer = distill_mod.Best.offer

    def offer(self, step, q):
        real_offer(self, step, q)
        kept.append((step, self.step))

    monkeypatch.setattr(distill_mod.Best, "offer", offer)
    report = Recorder()
    final = run_trial(config, ctx, report)
    assert [m["fidelity"] for m, _ in report.calls] == [1, 2, 3]
    assert [s for s, _ in kept] == [0, 2, 4, 6]  # the start, every check_every steps and the end
    assert final["distill_kept_step"] == kept[-1][1] and final["distill_s"] > 0
    q, _ = report.reloaded
    assert ctx.scorer(q)["score"] == pytest.approx(final["score"], rel=1e-5, abs=1e-7)


def test_distill_knobs_are_checked_like_the_other_methods():
    from dfq_search.errors import DfqError
    from dfq_search.search.method import distill_config, parse_method

    assert distill_config({"lr": 3e-4, "temperature": 2.0}, seed=5).seed == 5
    with pytest.raises(DfqError, match="unknown settings"):
        parse_method({"kind": "ptq+distill", "distill": {"learning_rate": 1e-4}})
    with pytest.raises(DfqError, match="adv_steps is 0"):
        parse_method({"kind": "ptq+distill", "distill": {"adv_eps": [0.1, 0.2]}})
    with pytest.raises(DfqError, match="no trial would use them"):
        parse_method({"kind": "ptq", "distill": {"lr": 1e-4}})
    with pytest.raises(DfqError, match="temperature"):
        parse_method({"kind": "ptq+distill", "distill": {"temperature": [0.0, 4.0]}})
    with pytest.raises(DfqError, match="campaign sets"):
        parse_method({"kind": "ptq+distill", "distill": {"seed": 3}})


def test_a_trials_configs_are_its_knobs_paths_over_the_configs_and_presets():
    """No mapping by hand: a knob sets the config field at its path (adasg's margin bounds too: they
    used to be dropped for every preset but adadfq); what no knob sets is the config's or preset's."""
    from dfq_search.ptq import PTQConfig, ReconConfig
    from dfq_search.qat import load_config
    from dfq_search.search.method import TRIAL_GAME, game_config, ptq_config

    ptq = ptq_config({"modcap_k": 2, "recon.iters": 7, "act_range": "mse"}, seed=3)
    assert ptq == PTQConfig(modcap_k=2, act_range="mse", recon=ReconConfig(iters=7, seed=3))
    for preset in ("adadfq", "adasg"):
        knobs = {"sample_loss.lambda_l": 0.25, "sample_loss.weights.disagree": 0.4, "train.q_lr": 1e-5}
        cfg = game_config({"preset": preset, **knobs}, seed=4)
        own = load_config(preset)
        assert (cfg.sample_loss.lambda_l, cfg.sample_loss.lambda_u) == (0.25, own.sample_loss.lambda_u)
        assert cfg.sample_loss.weights == {**own.sample_loss.weights, "disagree": 0.4}  # one term set
        assert (cfg.train.q_lr, cfg.train.seed, cfg.train.iterations) == (1e-5, 4, own.train.iterations)
        assert (cfg.train.log_every, cfg.train.q_lr_milestones) == tuple(TRIAL_GAME.values())
    plain = game_config({"preset": "gdfq"})
    assert plain.sample_loss == load_config("gdfq").sample_loss


def test_an_infeasible_plan_reports_once_and_builds_nothing(tiny, monkeypatch):
    import dfq_search.ptq

    def fail(*args, **kwargs):
        raise AssertionError("an infeasible trial must not quantize")

    monkeypatch.setattr(dfq_search.ptq, "run_ptq", fail)
    ctx = _ctx(tiny, scorer=fail)
    config = {**_config(tiny), "feasible": False}
    calls = []
    final = run_trial(config, ctx, lambda m, folder: calls.append((m, folder)))
    assert calls == [(final, None)]
    assert final["feasible"] is False and final["score"] == INFEASIBLE_SCORE
    assert final["fidelity"] == ctx.reports  # counts as finished: no scheduler waits on it


def test_repair_false_over_budget_config_is_infeasible(tiny):
    sizes = []
    for seed in range(8):
        config = _config(tiny, seed=seed, max_size_kib=6.0, repair=False)
        sizes.append(config["cost"]["size_kib"])
        assert config["feasible"] == (config["cost"]["size_kib"] <= 6.0)
        if not config["feasible"]:
            report = Recorder()
            run_trial(config, _ctx(tiny), report)
            assert len(report.calls) == 1 and report.calls[0][0]["score"] == INFEASIBLE_SCORE
    assert min(sizes) <= 6.0 < max(sizes)


def test_a_nan_objective_fails_the_trial(tiny):
    def nan_scorer(q, fraction=1.0):
        return {"score": float("nan"), "kl": float("nan"), "n_scored": 1}

    calls = []
    with pytest.raises(TrialFailed, match="not finite"):
        run_trial(_config(tiny), _ctx(tiny, scorer=nan_scorer), lambda m, folder: calls.append(m))
    assert calls == []


def test_intermediate_marks():
    assert _marks(10, 2) == [4, 7]
    assert _marks(3, 0) == []
    assert all(0 < m < 100 for m in _marks(100, 9))


def test_a_trial_loads_the_groups_an_earlier_trial_reconstructed_with_the_same_prefix(tiny, tmp_path):
    ctx = _ctx(tiny)
    ctx.units = str(tmp_path / "units")
    config = _config(tiny)
    first = run_trial(config, ctx, Recorder())
    assert first["reused_units"] == 0
    plan = {**config["plan"], "block2.body.1.0": {"w": 2, "a": 4}}  # a layer of the third unit
    later = Recorder()
    second = run_trial({**config, "plan": plan}, ctx, later)
    assert second["reused_units"] == 2  # the stem and block1, reconstructed once
    assert [m.get("reused_units") for m, _ in later.calls][-1] == 2
    ctx.units = None
    assert run_trial({**config, "plan": plan}, ctx, Recorder())["score"] == second["score"]
