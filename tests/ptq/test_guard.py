"""The label-free guard of run_ptq: a reconstruction that loses fidelity on held-out images gives way
to the round-to-nearest start; a helpful one is kept; without held-out images nothing changes."""

from __future__ import annotations

import logging

import pytest
import torch

import dfq_search.ptq.pipeline as pipeline
from dfq_search.data import gaussian_batches
from dfq_search.errors import DfqError
from dfq_search.ptq import PTQConfig, ReconConfig, run_ptq
from dfq_search.ptq.guard import guard
from dfq_search.search.objective import FidelityScorer

RECON = ReconConfig(iters=40, lr=1e-2)


@pytest.fixture(scope="module")
def heldout(tiny):
    """The calibration batches' distribution, another draw (the reconstruction never sees them)."""
    return torch.cat(list(gaussian_batches(tiny.preprocess, 2, 32, 1)))


@pytest.fixture(scope="module")
def plain(tiny, batches, ptq_plan):
    """run_ptq without held-out images (no guard): the behaviour the guard must leave alone."""
    return run_ptq(tiny.model, ptq_plan(tiny, 2, 4), batches, PTQConfig(recon=RECON))


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _mse(q, p, x):
    return float((_out(q, x) - _out(p, x)).pow(2).mean())


@pytest.fixture
def harmful(monkeypatch):
    """Reconstruction made harmful: the real one, then every conv/linear weight of Q jolted by noise of
    its own spread (the per-unit fit on the calibration images is lost with it)."""
    real = pipeline.reconstruct_

    def corrupt(q, *args, **kwargs):
        records = real(q, *args, **kwargs)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in q.modules():
                w = getattr(m, "weight", None)
                if isinstance(w, torch.nn.Parameter) and w.dim() >= 2:
                    w.add_(torch.randn(w.shape, generator=gen) * w.std())
        return records

    monkeypatch.setattr(pipeline, "reconstruct_", corrupt)


def test_a_harmful_reconstruction_gives_way_to_round_to_nearest(
    tiny, batches, ptq_plan, heldout, harmful, caplog
):
    plan = ptq_plan(tiny, 2, 4)
    rtn = run_ptq(tiny.model, plan, batches, PTQConfig(reconstruct=False))
    with caplog.at_level(logging.WARNING, logger="dfq_search.ptq.pipeline"):
        res = run_ptq(tiny.model, plan, batches, PTQConfig(recon=RECON), heldout=heldout)
    g = res.guard
    assert g["kept"] == "rtn" and g["metric"] == "mse" and g["images"] == len(heldout)
    assert g["reconstructed"] > g["rtn"]
    for x in (heldout, batches[0]):  # the returned model is the RTN start, bit for bit
        assert torch.equal(_out(res.model, x), _out(rtn.model, x))
    assert g["rtn"] == pytest.approx(_mse(rtn.model, tiny.model, heldout), rel=1e-5)
    assert res.unit_errors == rtn.unit_errors  # the errors are those of the model returned
    assert res.records and res.summary()["guard"] == g
    assert "keeping the round-to-nearest model" in caplog.text

    off = run_ptq(tiny.model, plan, batches, PTQConfig(recon=RECON, guard=False), heldout=heldout)
    assert off.guard is None  # without the guard the harm goes through
    assert _mse(off.model, tiny.model, heldout) > 1.5 * _mse(rtn.model, tiny.model, heldout)


def test_a_helpful_reconstruction_is_kept_unchanged(tiny, batches, ptq_plan, heldout, plain):
    res = run_ptq(tiny.model, ptq_plan(tiny, 2, 4), batches, PTQConfig(recon=RECON), heldout=heldout)
    g = res.guard
    assert g["kept"] == "reconstructed" and g["reconstructed"] < 0.8 * g["rtn"]
    assert g["reconstructed"] == pytest.approx(_mse(res.model, tiny.model, heldout), rel=1e-5)
    # the same metric as the search's label-free objective, computed in one place
    assert g["reconstructed"] == FidelityScorer(tiny.model, heldout, "mse")(res.model)["mse"]
    for x in (heldout, batches[0]):  # the guard only looked: the model is the unguarded run's
        assert torch.equal(_out(res.model, x), _out(plain.model, x))
    assert res.unit_errors == plain.unit_errors and res.groups == plain.groups


def test_without_heldout_images_nothing_changes(tiny, batches, ptq_plan, heldout, plain):
    assert plain.guard is None and plain.summary()["guard"] is None
    plan = ptq_plan(tiny, 2, 4)
    off = run_ptq(tiny.model, plan, batches, PTQConfig(recon=RECON, guard=False), heldout=heldout)
    assert off.guard is None and torch.equal(_out(off.model, heldout), _out(plain.model, heldout))
    rtn = run_ptq(tiny.model, plan, batches, PTQConfig(reconstruct=False), heldout=heldout)
    assert rtn.guard is None  # nothing reconstructed, nothing to compare


def test_ties_go_to_the_reconstruction(tiny, heldout, plain):
    same = guard(tiny.model, plain.model, plain.model, heldout)
    assert same["rtn"] == same["reconstructed"] and same["kept"] == "reconstructed"
    assert guard(tiny.model, plain.model, tiny.model, heldout)["kept"] == "reconstructed"  # P is exact
    assert guard(tiny.model, tiny.model, plain.model, heldout)["kept"] == "rtn"


def test_bad_guard_settings_and_heldout_are_refused(tiny, batches, ptq_plan):
    for bad in ("yes", 1, None):
        with pytest.raises(DfqError, match="guard.*True or False"):
            PTQConfig(guard=bad)
    with pytest.raises(DfqError, match="did you mean 'guard'"):
        PTQConfig.from_dict({"gaurd": False})
    cfg = PTQConfig.from_dict({"guard": False, "recon": {"iters": 3}})
    assert cfg.guard is False and PTQConfig.from_dict(cfg.to_dict()) == cfg
    assert PTQConfig().guard is True
    plan = ptq_plan(tiny, 4, 4)
    for empty in ([], torch.empty(0, 3, 16, 16)):
        with pytest.raises(DfqError, match="at least one held-out image"):
            run_ptq(tiny.model, plan, batches, PTQConfig(recon=RECON), heldout=empty)
