"""evaluate / Evaluator: top-1 and agreement on hand-made cases."""

from __future__ import annotations

import torch
from torch import nn

from dfq_search.data import ImageData
from dfq_search.evaluate import EvalResult, Evaluator, evaluate
from dfq_search.models import create_model
from dfq_search.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess

P = Preprocess(4, None, IMAGENET_MEAN, IMAGENET_STD, 3)


class Constant(nn.Module):
    """Always predicts ``cls`` out of 3."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 3)
        out[:, self.cls] = 1
        return out


def _data() -> ImageData:
    labels = torch.tensor([0, 0, 1, 2, 0, 1, 2, 2, 0, 1])  # 4 of 10 are class 0
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    return ImageData(images, labels, ["a", "b", "c"])


def test_constant_model():
    data = _data()
    zero = Constant(0)
    result = evaluate(zero, data, P, reference=zero, batch_size=3)
    assert isinstance(result, EvalResult)
    assert (result.top1, result.agreement, result.n) == (40.0, 100.0, 10)
    assert evaluate(zero, data, P).agreement is None
    assert evaluate(Constant(2), data, P, reference=zero).agreement == 0.0


def test_evaluator_computes_the_reference_once_and_restores_modes():
    data = _data()
    calls = []
    ref = Constant(1)
    ref.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    evaluator = Evaluator(data, P, reference=ref, batch_size=4)
    assert calls == [1, 4, 4, 2]  # the layout probe (one image, dfq_search.layout), then 10 in 4s
    model = Constant(1).train()
    result = evaluator(model)
    assert (result.top1, result.agreement) == (30.0, 100.0)
    evaluator(Constant(0))
    assert len(calls) == 4 and model.training


def test_real_model_agrees_with_itself():
    bundle = create_model("tiny_resnet")
    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)
    data = ImageData(images, torch.randint(0, 10, (20,)), [str(i) for i in range(10)])
    result = evaluate(bundle.model, data, bundle.preprocess, reference=bundle.model)
    assert result.agreement == 100.0 and 0.0 <= result.top1 <= 100.0 and result.seconds > 0
