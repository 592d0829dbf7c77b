"""load_image_folder: ImageFolder order, decoding geometry, the on-disk and in-process caches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dfq_search.cache import cache_dir
from dfq_search.data import clear_memo, load_image_folder
from dfq_search.data import folder as folder_module
from dfq_search.errors import DfqError
from dfq_search.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess

P16 = Preprocess(16, None, IMAGENET_MEAN, IMAGENET_STD, 3)


def _folder(root: Path, size: tuple[int, int] = (16, 16)) -> Path:
    """Classes 'cat' (2 PNG) and 'ant' (3 JPEG), with a stray text file and a hidden folder."""
    rng = np.random.default_rng(0)
    for cls, n, ext in (("cat", 2, "png"), ("ant", 3, "jpg")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.{ext}")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


@pytest.fixture(autouse=True)
def _fresh_memo():
    clear_memo()
    yield
    clear_memo()


def test_labels_order_and_shape(tmp_path: Path):
    root = _folder(tmp_path / "imgs")
    data = load_image_folder(root, P16)
    assert data.classes == ["ant", "cat"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.images.dtype == torch.uint8 and data.images.shape == (5, 3, 16, 16)
    png = np.asarray(Image.open(root / "cat" / "1.png")).transpose(2, 0, 1)
    assert np.array_equal(data.images[4].numpy(), png)  # lossless file, exact pixels
    assert len(load_image_folder(root, P16, limit_per_class=1)) == 2


def test_decodes_once_then_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = _folder(tmp_path / "imgs")
    first = load_image_folder(root, P16)
    assert load_image_folder(root, P16) is first  # in-process memo
    assert len(list((cache_dir() / "images").glob("*.npy"))) >= 1
    clear_memo()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the images are cached")

    monkeypatch.setattr(folder_module, "decode_image", no_decoding)
    second = load_image_folder(root, P16)
    assert second is not first and torch.equal(second.images, first.images)
    assert torch.equal(second.labels, first.labels)
    # A changed file changes the key: decoded again.
    os.utime(root / "ant" / "0.jpg", ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load_image_folder(root, P16)


def test_resize_and_crop_match_torchvision(tmp_path: Path):
    root = _folder(tmp_path / "imgs", size=(40, 30))
    pre = Preprocess(16, 20, IMAGENET_MEAN, IMAGENET_STD, 3)
    data = load_image_folder(root, pre)
    ref = transforms.Compose([transforms.Resize(20), transforms.CenterCrop(16)])
    expected = np.asarray(ref(Image.open(root / "ant" / "0.jpg").convert("RGB")))
    assert np.array_equal(data.images[0].numpy(), expected.transpose(2, 0, 1))


def test_grayscale_decoding(tmp_path: Path):
    root = _folder(tmp_path / "imgs")
    data = load_image_folder(root, Preprocess(16, None, (0.5,), (0.5,), channels=1))
    assert data.images.shape == (5, 1, 16, 16)


def test_not_an_image_folder(tmp_path: Path):
    with pytest.raises(DfqError, match="not found"):
        load_image_folder(tmp_path / "missing", P16)
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(DfqError, match="not a directory"):
        load_image_folder(tmp_path / "file.jpg", P16)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "a.png")
    with pytest.raises(DfqError, match=r"root/<class>/<image>\.jpg"):
        load_image_folder(flat, P16)
    (flat / "empty_class").mkdir()
    with pytest.raises(DfqError, match="without images"):
        load_image_folder(flat, P16)


def test_corrupt_image_names_the_file(tmp_path: Path):
    root = _folder(tmp_path / "imgs")
    (root / "cat" / "9.jpg").write_bytes(b"garbage")
    with pytest.raises(DfqError, match="9.jpg"):
        load_image_folder(root, P16)


def test_bad_limit(tmp_path: Path):
    with pytest.raises(DfqError, match="limit_per_class"):
        load_image_folder(_folder(tmp_path / "imgs"), P16, limit_per_class=0)
