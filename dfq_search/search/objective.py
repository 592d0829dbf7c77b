"""What a trial maximises: top-1 on the user's labelled validation images, or, with no data at all, a
label-free fidelity to P on held-out synthetic samples (never the samples Q was calibrated on).

Both hold P's outputs, computed once in the driver, and score a fraction of their images during a
trial (``fraction``; evenly spaced) and all of them when the campaign re-evaluates its candidates.
``score`` is the value maximised: top-1 (%), agreement with P (%), −KL(P ‖ Q) in nats, or −MSE of the
logits (Q's against P's, averaged over images and classes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dfq_search.data.image_data import ImageData
from dfq_search.errors import DfqError
from dfq_search.evaluate import Evaluator
from dfq_search.fidelity import METRICS, fidelity, logits, score
from dfq_search.models.base import Preprocess

SCORE_NAMES = {
    "top1": "top-1 (%) on the validation images",
    "agreement": "agreement with the full-precision model (%) on held-out samples",
    "kl": "-KL(P || Q) on held-out samples (nats; 0: Q = P)",
    "mse": "-MSE of the logits to the full-precision model on held-out samples (0: Q = P)",
}


def score_name(metric: str) -> str:
    """What a campaign's ``score`` is, in words (higher is always better)."""
    return SCORE_NAMES.get(metric, metric)


def _take(n_total: int, fraction: float) -> int:
    return max(1, min(n_total, math.ceil(n_total * fraction)))


def _spaced(n_total: int, n: int) -> Tensor:
    return torch.linspace(0, n_total - 1, n).round().long()


LABEL_FREE = METRICS  # computed in dfq_search.fidelity
# What `metric: auto` uses without labelled data: over 123 kept ResNet-20 models of 13 campaigns the
# logits' MSE ranks them against real top-1 better than KL or agreement on the same 256 images
# (benchmarks/label_free_objectives.py; README, "Measured results").
DEFAULT_LABEL_FREE = "mse"


class FidelityScorer:
    """Agreement, KL(P ‖ Q) and the logits' MSE on held-out synthetic images (in P's input space)."""

    def __init__(
        self, p: nn.Module, images: Tensor, metric: str = DEFAULT_LABEL_FREE, batch_size: int = 256
    ) -> None:
        if metric not in LABEL_FREE:
            raise DfqError("label-free metric", metric, f"one of {LABEL_FREE}", "top1 needs --val-data")
        self.images, self.metric, self.batch_size = images.cpu(), metric, batch_size
        self.ref = logits(p, self.images, batch_size)

    def __call__(self, q: nn.Module, fraction: float = 1.0) -> dict[str, float]:
        idx = _spaced(len(self.images), _take(len(self.images), fraction))
        out = fidelity(logits(q, self.images[idx], self.batch_size), self.ref[idx])
        return {"score": score(out, self.metric), **out, "n_scored": len(idx)}


class LabelledScorer:
    """Top-1 (and agreement with P) on the user's labelled validation images."""

    def __init__(self, p: nn.Module, data: ImageData, preprocess: Preprocess, batch_size: int = 128) -> None:
        self.data, self.preprocess, self.batch_size = data, preprocess, batch_size
        self.device = next(p.parameters()).device
        self.full = Evaluator(data, preprocess, reference=p, batch_size=batch_size, device=self.device)
        self.metric = "top1"

    def __call__(self, q: nn.Module, fraction: float = 1.0) -> dict[str, float]:
        n = _take(len(self.data), fraction)
        ev = self.full
        ev.device = self.device = next(q.parameters()).device  # a trial may run where the driver did not
        if n < len(self.data):
            idx = _spaced(len(self.data), n)
            ev = Evaluator(
                ImageData(self.data.images[idx], self.data.labels[idx], self.data.classes),
                self.preprocess,
                batch_size=self.batch_size,
                device=self.device,
            )
            ev.reference_preds = self.full.reference_preds[idx]
        r = ev(q)
        return {"score": r.top1, "top1": r.top1, "agreement": r.agreement or 0.0, "n_scored": r.n}
