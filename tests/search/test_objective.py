"""The objectives: label-free fidelity to P on held-out images, and top-1 on labelled images."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dfq_search.data.image_data import ImageData
from dfq_search.errors import DfqError
from dfq_search.evaluate import Evaluator
from dfq_search.models import create_model
from dfq_search.quant import PROTOCOLS, BitPlan, calibrate_, quantized_copy
from dfq_search.search.objective import FidelityScorer, LabelledScorer


@pytest.fixture(scope="module")
def p_and_images(with_running_stats):
    bundle = create_model("tiny_cnn")
    p = with_running_stats(bundle.model, bundle.preprocess.shape)
    with torch.no_grad():
        p.head[-1].weight.mul_(20.0)  # confident logits, as a trained P has
    gen = torch.Generator().manual_seed(1)
    images = 0.6 * torch.randn(40, *bundle.preprocess.shape, generator=gen) + 0.3
    return p, images


def _w2(p, images):
    q = quantized_copy(p, BitPlan.uniform(2, 8), images[:1], PROTOCOLS["ptq"].config)
    calibrate_(q, [images[:20]])
    return q.eval()


def test_p_itself_is_perfectly_faithful(p_and_images):
    p, images = p_and_images
    scorer = FidelityScorer(p, images, "kl")
    r = scorer(p)
    assert r["agreement"] == 100.0 and r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["score"] == pytest.approx(-r["kl"]) and r["n_scored"] == 40
    assert FidelityScorer(p, images, "agreement")(p)["score"] == 100.0
    assert r["mse"] == pytest.approx(0.0, abs=1e-9) and FidelityScorer(p, images, "mse")(p)["score"] == 0.0


def test_a_two_bit_copy_scores_lower(p_and_images):
    p, images = p_and_images
    q = _w2(p, images)
    kl_scorer, agree_scorer = FidelityScorer(p, images, "kl"), FidelityScorer(p, images, "agreement")
    r = kl_scorer(q)
    assert r["kl"] > 1e-3 and r["score"] < kl_scorer(p)["score"]
    assert r["agreement"] < 100.0 and agree_scorer(q)["score"] == r["agreement"]
    z, ref = q(images).detach(), p(images).detach()
    assert r["mse"] == pytest.approx(((z - ref) ** 2).mean().item(), rel=1e-4) and r["mse"] > 0
    assert FidelityScorer(p, images, "mse")(q)["score"] == pytest.approx(-r["mse"])
    assert math.isfinite(r["score"])


def test_a_fraction_scores_evenly_spaced_images(p_and_images):
    p, images = p_and_images
    q = _w2(p, images)
    scorer = FidelityScorer(p, images, batch_size=7)  # batches of the reference and of Q need not align
    r = scorer(q, fraction=0.25)
    assert r["n_scored"] == 10
    idx = torch.linspace(0, 39, 10).round().long()
    same = FidelityScorer(p, images[idx])(q)
    assert r["kl"] == pytest.approx(same["kl"], rel=1e-5) and r["agreement"] == same["agreement"]
    assert scorer(q, fraction=1e-9)["n_scored"] == 1
    assert scorer(q, fraction=1.0)["kl"] == pytest.approx(FidelityScorer(p, images)(q)["kl"], rel=1e-5)


def test_scoring_leaves_the_models_mode_alone(p_and_images):
    p, images = p_and_images
    q = copy.deepcopy(p).train()
    FidelityScorer(p, images)(q)
    assert q.training


def test_top1_needs_labels():
    with pytest.raises(DfqError, match="top1 needs --val-data"):
        FidelityScorer(torch.nn.Linear(2, 2), torch.zeros(1, 2), metric="top1")


@pytest.fixture(scope="module")
def digits(shared_cache):
    from dfq_search.data.digits import load_digits_split

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFQ_SEARCH_CACHE", str(shared_cache))  # digits_cnn trains once per test session
        bundle = create_model("digits_cnn")
    return bundle, load_digits_split("test")


def test_labelled_scorer_agrees_with_the_evaluator(digits):
    bundle, test = digits
    p = bundle.model
    noisy = copy.deepcopy(p)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in noisy.parameters():
            w.add_(0.3 * w.std() * torch.randn(w.shape, generator=gen))
    scorer = LabelledScorer(p, test, bundle.preprocess)
    ev = Evaluator(test, bundle.preprocess, reference=p)
    for model in (p, noisy):
        got, want = scorer(model), ev(model)
        assert got["top1"] == got["score"] == want.top1
        assert got["agreement"] == want.agreement and got["n_scored"] == want.n == len(test)
    assert scorer(p)["agreement"] == 100.0
    assert scorer(noisy)["top1"] < scorer(p)["top1"]


def test_labelled_scorer_fraction(digits):
    bundle, test = digits
    p = bundle.model
    noisy = copy.deepcopy(p)
    with torch.no_grad():
        noisy.head[-1].weight.mul_(-1.0)  # disagrees with P on most images
    scorer = LabelledScorer(p, test, bundle.preprocess)
    got = scorer(noisy, fraction=0.5)
    idx = torch.linspace(0, len(test) - 1, got["n_scored"]).round().long()
    assert got["n_scored"] == math.ceil(len(test) / 2)
    part = ImageData(test.images[idx], test.labels[idx], test.classes)
    want = Evaluator(part, bundle.preprocess, reference=p)(noisy)
    assert got["top1"] == want.top1 and got["agreement"] == want.agreement
