"""Channels-last inputs only for models that take them; a model that ``view``s a feature map runs."""

from __future__ import annotations

import torch
from torch import nn

from dfq_search.layout import accepts_channels_last, fast_input
from dfq_search.quant import ActQuantizer


class Viewing(nn.Module):
    """A VGG-style head written as much user code is: ``x.view(n, -1)`` on a 4×4 feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(128, 10)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4)
        return self.fc(x.view(x.size(0), -1))


class Flattening(Viewing):
    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4)
        return self.fc(torch.flatten(x, 1))


def test_a_model_that_views_gets_the_default_layout_and_runs():
    model, x = Viewing().eval(), torch.randn(4, 3, 16, 16)
    assert not accepts_channels_last(model, x)
    out = fast_input(model, x)
    assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)
    model(out)


def test_a_model_that_flattens_gets_channels_last_with_the_same_outputs():
    model, x = Flattening().eval(), torch.randn(4, 3, 16, 16)
    out = fast_input(model, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(out), model(x), rtol=1e-4, atol=1e-5)
    assert fast_input(model, torch.randn(4, 10)).dim() == 2  # not an image batch: unchanged


def test_the_probe_moves_no_range_and_no_train_flag():
    model = nn.Sequential(ActQuantizer(4), nn.Conv2d(3, 4, 3), nn.Flatten()).train()
    accepts_channels_last(model, torch.randn(2, 3, 8, 8))
    assert int(model[0].n_obs) == 0 and model[0].observing
    assert model.training and model[1].training


def test_predict_and_run_ptq_on_a_model_that_views():
    from dfq_search.data.image_data import ImageData
    from dfq_search.evaluate import predict
    from dfq_search.models.base import Preprocess
    from dfq_search.ptq import PTQConfig, ReconConfig, run_ptq
    from dfq_search.quant import BitPlan

    model = Viewing().eval()
    images = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    data = ImageData(images, torch.zeros(6, dtype=torch.long), ["a"])
    assert predict(model, data, Preprocess(16, None, (0.5,) * 3, (0.25,) * 3)).shape == (6,)
    plan = BitPlan({"conv": {"w": 4, "a": 8}, "fc": {"w": 4, "a": 4}})
    result = run_ptq(model, plan, [torch.randn(8, 3, 16, 16)], PTQConfig(recon=ReconConfig(iters=2)))
    assert result.model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
