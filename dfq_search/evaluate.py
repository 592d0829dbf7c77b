"""Top-1 accuracy and agreement with a reference model, on images decoded once.

``Evaluator`` holds the data, the preprocessing and the reference's predictions (computed once),
so a search can score many quantized variants of a model cheaply; ``evaluate`` is the one-shot form.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dfq_search.data.image_data import ImageData
from dfq_search.errors import DfqError
from dfq_search.layout import eval_mode, fast_input
from dfq_search.models.base import Preprocess

# Measured on 2 CPU cores (CIFAR ResNet-20, 10k images): 128 beat 64, 256 and 500; small batches
# keep the activations in cache.
DEFAULT_BATCH = 128


@dataclass(frozen=True)
class EvalResult:
    """``top1`` and ``agreement`` in percent; ``agreement`` is None without a reference."""

    top1: float
    agreement: float | None
    n: int
    seconds: float


@torch.inference_mode()
def predict(
    model: nn.Module,
    data: ImageData,
    preprocess: Preprocess,
    batch_size: int = DEFAULT_BATCH,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The argmax class of every image, int64 [N] on CPU, with ``model`` in eval mode.

    The model's train/eval flags are restored afterwards. CPU inputs go in channels_last memory
    format where the model takes it (:mod:`dfq_search.layout`).
    """
    _check_device(model, device)
    with eval_mode(model):
        preds = [
            model(fast_input(model, x)).argmax(1).cpu()
            for x, _ in data.batches(preprocess, batch_size, device)
        ]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


class Evaluator:
    """Scores models on ``data``; the reference's predictions are computed once, here."""

    def __init__(
        self,
        data: ImageData,
        preprocess: Preprocess,
        *,
        reference: nn.Module | None = None,
        batch_size: int = DEFAULT_BATCH,
        device: torch.device | str = "cpu",
    ) -> None:
        self.data, self.preprocess = data, preprocess
        self.batch_size, self.device = batch_size, device
        self.reference_preds = (
            None if reference is None else predict(reference, data, preprocess, batch_size, device)
        )

    def __call__(self, model: nn.Module) -> EvalResult:
        """Top-1 of ``model`` (percent) and its agreement with the reference's argmax."""
        start = time.perf_counter()
        preds = predict(model, self.data, self.preprocess, self.batch_size, self.device)
        n = len(preds)
        top1 = 100.0 * (preds == self.data.labels).sum().item() / max(n, 1)
        agreement = None
        if self.reference_preds is not None:
            agreement = 100.0 * (preds == self.reference_preds).sum().item() / max(n, 1)
        return EvalResult(top1, agreement, n, time.perf_counter() - start)


def evaluate(
    model: nn.Module,
    data: ImageData,
    preprocess: Preprocess,
    *,
    reference: nn.Module | None = None,
    batch_size: int = DEFAULT_BATCH,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """One evaluation; build an ``Evaluator`` instead to score many models against one reference."""
    evaluator = Evaluator(data, preprocess, reference=reference, batch_size=batch_size, device=device)
    return evaluator(model)


def _check_device(model: nn.Module, device: torch.device | str) -> None:
    param = next(model.parameters(), None)
    want = torch.device(device)
    if param is not None and param.device.type != want.type:
        raise DfqError(
            "model is on another device",
            str(param.device),
            f"the evaluation device {want}",
            f"move it first: model.to({str(want)!r})",
        )
