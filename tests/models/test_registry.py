"""The model registry: names, user models, weights files and their errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from dfq_search.errors import DfqError
from dfq_search.models import ModelBundle, create_model, list_models, register_model
from dfq_search.models.cifar_resnet import CifarResNet

HELPER = "dfq_user_model_helper"


@pytest.fixture
def helper_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_list_models_has_the_required_names():
    names = list_models()
    for name in ("cifar_resnet20", "cifar_resnet110", "resnet18", "mobilenet_v2", "tiny_cnn"):
        assert name in names
    assert names == sorted(names)
    assert list_models("cifar_*") == [n for n in names if n.startswith("cifar_")]


def test_unknown_name_lists_valid_names_and_the_closest():
    with pytest.raises(DfqError, match="did you mean 'cifar_resnet20'") as info:
        create_model("cifar_resnt20")
    assert "tiny_cnn" in str(info.value) and "Fix:" in str(info.value)


def test_duplicate_registration_raises():
    with pytest.raises(DfqError, match="already registered"):
        register_model("tiny_cnn")(lambda weights, num_classes: None)


def test_bundle_is_in_eval_mode_with_its_metadata():
    bundle = create_model("cifar_resnet20", num_classes=7)
    assert isinstance(bundle, ModelBundle) and not bundle.model.training
    assert (bundle.name, bundle.num_classes) == ("cifar_resnet20", 7)
    assert bundle.model(bundle.preprocess.example_input(2)).shape == (2, 7)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(DfqError, match="num_classes"):
        create_model("tiny_cnn", num_classes=bad)


def test_weights_round_trip_strict(tmp_path: Path):
    model = CifarResNet(20)
    path = tmp_path / "w.th"
    # The format of the reference files: DataParallel prefix, inside a 'state_dict' entry.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "best_prec1": 91.7}, path)
    loaded = create_model("cifar_resnet20", weights=path).model
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_mismatched_weights_name_the_depth(tmp_path: Path):
    path = tmp_path / "resnet32.th"
    torch.save(CifarResNet(32).state_dict(), path)
    with pytest.raises(DfqError, match="looks like cifar_resnet32") as info:
        create_model("cifar_resnet20", weights=path)
    assert "unexpected" in str(info.value) and str(path) in str(info.value)


def test_wrong_head_size_is_a_shape_mismatch(tmp_path: Path):
    path = tmp_path / "w.pt"
    torch.save(CifarResNet(20, num_classes=100).state_dict(), path)
    with pytest.raises(DfqError, match="shape mismatches") as info:
        create_model("cifar_resnet20", weights=path)
    assert "linear.weight" in str(info.value)


def test_missing_weights_file(tmp_path: Path):
    with pytest.raises(DfqError, match="weights file not found"):
        create_model("tiny_cnn", weights=tmp_path / "nope.pt")


def test_file_that_is_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DfqError, match="not a loadable torch checkpoint"):
        create_model("tiny_cnn", weights=path)


class _Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(DfqError, match="weights_only=True"):
        create_model("tiny_cnn", weights=path)
    assert not marker.exists()


def test_checkpoint_without_tensors(tmp_path: Path):
    path = tmp_path / "w.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(DfqError, match="no state dict"):
        create_model("tiny_cnn", weights=path)


def test_user_model_with_preprocess_overrides(helper_on_path, tmp_path: Path):
    bundle = create_model(f"{HELPER}:build", num_classes=3, input_size=16, mean=(0.5,), std=(0.25,))
    assert bundle.num_classes == 3 and bundle.preprocess.shape == (1, 16, 16)
    assert bundle.model(bundle.preprocess.example_input(2)).shape == (2, 3)
    # num_classes read from the output; weights load strictly.
    path = tmp_path / "w.pt"
    torch.save(bundle.model.state_dict(), path)
    again = create_model(f"{HELPER}:build", weights=path, mean=(0.5,), std=(0.25,), num_classes=3)
    assert torch.equal(again.model[-1].weight, bundle.model[-1].weight)
    assert create_model(f"{HELPER}:build", mean=(0.5,), std=(0.25,)).num_classes == 10
    assert create_model(f"{HELPER}:fixed_head").num_classes == 2  # 32x32 RGB by default


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a:b:c", "bad user model name"),
        ("mod:", "bad user model name"),
        ("no_such_module_dfq:build", "cannot import 'no_such_module_dfq'"),
        (f"{HELPER}:biuld", "did you mean 'build'"),
        (f"{HELPER}:not_a_module", "did not return an nn.Module"),
        (f"{HELPER}:NOT_CALLABLE", "not callable"),
        (f"{HELPER}:fixed_head", "takes no num_classes"),
        (f"{HELPER}:build", "failed on an input"),  # 3-channel default input, 1-channel model
    ],
)
def test_user_model_errors(helper_on_path, name, message):
    num_classes = 2 if name.endswith("fixed_head") else None
    with pytest.raises(DfqError, match=message):
        create_model(name, num_classes=num_classes)


def test_preprocessing_of_a_fixed_model_is_its_own_or_refused():
    with pytest.raises(
        DfqError, match=r"contradicts cifar_resnet20: got \{'input_size': 64\}.*'input_size': 32"
    ):
        create_model("cifar_resnet20", input_size=64)
    own = create_model("cifar_resnet20", input_size=32, mean=[0.485, 0.456, 0.406])  # its own: accepted
    assert own.preprocess == create_model("cifar_resnet20").preprocess
    with pytest.raises(DfqError, match="preprocessing keys"):
        create_model("cifar_resnet20", input_sise=32)


def test_a_torchvision_model_takes_another_input_size_and_keeps_its_resize_ratio():
    bundle = create_model("tv:mobilenet_v3_small", num_classes=5, input_size=96)
    assert (bundle.preprocess.input_size, bundle.preprocess.resize) == (96, 110)  # 256/224 of 96
    assert bundle.model(bundle.preprocess.example_input(2)).shape == (2, 5)
    assert create_model("resnet18", input_size=64, resize=64).preprocess.resize == 64
    with pytest.raises(DfqError, match=r"resnet18 failed on an input of shape \(2, 1, 224, 224\).*--mean"):
        create_model("resnet18", mean=[0.5], std=[0.5])
    with pytest.raises(DfqError, match="--mean without --std"):
        create_model("resnet18", mean=[0.5])


def test_torchvision_models_by_name():
    bundle = create_model("resnet18", num_classes=10)
    assert bundle.preprocess.input_size == 224 and bundle.preprocess.resize == 256
    assert bundle.num_classes == 10 and bundle.model.fc.out_features == 10
    assert create_model("mobilenet_v2").num_classes == 1000
    tv = create_model("tv:squeezenet1_0", num_classes=5)
    assert tv.model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
    assert not any(getattr(m, "inplace", False) for m in bundle.model.modules())


def test_unknown_torchvision_model():
    with pytest.raises(DfqError, match="did you mean 'resnet18'"):
        create_model("tv:resnet81")
