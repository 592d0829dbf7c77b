"""Direct image optimisation: matches BN statistics, seeded, leaves P alone, refuses bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dfq_search.errors import DfqError
from dfq_search.synth.bn import bn_loss, bn_statistics
from dfq_search.synth.direct import DirectConfig, synthesize_images

FAST = {"iterations": 30, "batch_size": 8, "lr": 0.25}  # tiny_cnn's artificial statistics: lr 1.0 overshoots


def test_shapes_labels_and_bn_matching(tiny) -> None:
    model, prep = tiny
    history: list[dict[str, float]] = []
    progress: list[tuple[int, int]] = []
    x, y = synthesize_images(model, prep.shape, 10, 12, seed=1, history=history, preprocess=prep,
                             progress=lambda done, total: progress.append((done, total)), **FAST)  # fmt: skip
    assert x.shape == (12, *prep.shape) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (12,) and y.dtype == torch.int64 and y.min() >= 0 and y.max() < 10
    assert len(history) == 2 and progress == [(8, 12), (12, 12)]  # batches of 8 and 4
    with torch.no_grad(), bn_statistics(model) as stats:
        model(torch.randn(8, *prep.shape))
        noise = bn_loss(stats).item()
        model(x[:8])
        synth = bn_loss(stats).item()
    assert synth < 0.2 * noise
    low = (-torch.tensor(prep.mean) / torch.tensor(prep.std)).view(1, -1, 1, 1)
    high = ((1 - torch.tensor(prep.mean)) / torch.tensor(prep.std)).view(1, -1, 1, 1)
    assert (x >= low - 1e-6).all() and (x <= high + 1e-6).all()


def test_seeded_and_p_untouched(tiny) -> None:
    model, prep = tiny
    state = copy.deepcopy(model.state_dict())
    a = synthesize_images(model, prep.shape, 10, 4, seed=3, **FAST)
    b = synthesize_images(model, prep.shape, 10, 4, seed=3, **FAST)
    c = synthesize_images(model, prep.shape, 10, 4, seed=4, **FAST)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_ce_term_drives_labels(tiny) -> None:
    model, prep = tiny
    # the absolute BN loss: on tiny_cnn's artificial statistics the scale-free one outweighs CE (0.19)
    cfg = DirectConfig(iterations=40, batch_size=16, ce_weight=1.0, lr=0.25, bn_relative=False)
    x, y = synthesize_images(model, prep.shape, 10, 16, config=cfg)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.6  # chance: 0.1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 7}, "num_classes"),
        ({"n_images": 0}, "n_images"),
        ({"input_shape": (3, 16)}, "input_shape"),
    ],
)
def test_bad_input_is_refused(tiny, kwargs, match) -> None:
    model, prep = tiny
    args = {"input_shape": prep.shape, "num_classes": 10, "n_images": 4, **kwargs}
    with pytest.raises(DfqError, match=match):
        synthesize_images(model, args["input_shape"], args["num_classes"], args["n_images"])


def test_bad_config_and_model_without_bn() -> None:
    with pytest.raises(DfqError, match="tv_weight"):
        DirectConfig(tv_weight=-1.0)
    with pytest.raises(DfqError, match="bn_floor.*bn_relative"):  # it floors the scale-free loss only
        DirectConfig(bn_relative=False, bn_floor=0.1)
    assert DirectConfig().bn_floor == 0.0 and DirectConfig(bn_floor=0.1).bn_floor == 0.1
    assert DirectConfig(bn_relative=False, lr=0.25).bn_floor == 0.0  # the first defaults, still accepted
    with pytest.raises(DfqError, match="BatchNorm"):
        synthesize_images(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2, 2), 3, 2)


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_gray_dwnet"])
def test_pixels_stay_in_the_box_of_1_and_3_channel_inputs(name, with_running_stats) -> None:
    """Every synthetic pixel maps back into [0, 1] through the model's own mean/std, per channel."""
    from dfq_search.models import create_model

    bundle = create_model(name)
    model, prep = with_running_stats(bundle.model, bundle.preprocess.shape), bundle.preprocess
    std, mean = torch.tensor(prep.std).view(1, -1, 1, 1), torch.tensor(prep.mean).view(1, -1, 1, 1)
    x, _ = synthesize_images(model, prep.shape, 10, 8, seed=0, preprocess=prep, **FAST)
    pixels = x * std + mean
    assert x.shape[1] == prep.channels
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    free = DirectConfig(clamp=False, **FAST)  # the box binds: without it pixels leave [0, 1]
    x, _ = synthesize_images(model, prep.shape, 10, 8, seed=0, preprocess=prep, config=free)
    assert ((x * std + mean - 0.5).abs() > 0.5 + 1e-3).any()


def test_box_of_another_channel_count_is_refused(tiny) -> None:
    model, prep = tiny
    with pytest.raises(DfqError, match="channels"):
        synthesize_images(model, prep.shape, 10, 2, config=DirectConfig(mean=(0.1,), std=(0.3,)), **FAST)
