"""ImageData batches, Preprocess.normalize, the digits split and noise batches."""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms

from dfq_search.data import ImageData, gaussian_batches, load_digits_split
from dfq_search.errors import DfqError
from dfq_search.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess

P = Preprocess(8, None, IMAGENET_MEAN, IMAGENET_STD, 3)


def test_normalize_matches_totensor_normalize():
    u = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ref = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(u.float() / 255)
    torch.testing.assert_close(P.normalize(u), ref, rtol=1e-5, atol=1e-5)
    assert P.example_input(2).shape == (2, 3, 8, 8)


def test_preprocess_validates():
    with pytest.raises(DfqError, match="channels"):
        Preprocess(8, None, (0.5,), (0.5,), channels=3)
    with pytest.raises(DfqError, match="resize"):
        Preprocess(32, 16, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(DfqError, match="uint8"):
        P.normalize(torch.zeros(1, 3, 8, 8))
    assert Preprocess(8, None, [0.5], [0.5], 1).mean == (0.5,)  # lists become tuples


def test_batches_in_order():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    data = ImageData(images, torch.arange(10), [str(i) for i in range(10)])
    got = list(data.batches(P, batch_size=4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in got]), torch.arange(10))
    torch.testing.assert_close(torch.cat([x for x, _ in got]), P.normalize(images))
    with pytest.raises(DfqError, match="another input shape"):
        next(data.batches(Preprocess(16, None, IMAGENET_MEAN, IMAGENET_STD), 4))


def test_digits_split_is_deterministic_and_stratified():
    train, test = load_digits_split("train"), load_digits_split("test")
    assert (len(train), len(test)) == (1257, 540)
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 255
    assert torch.bincount(test.labels).min() >= 50  # about 54 per class
    from dfq_search.data import digits

    digits._split.cache_clear()
    assert torch.equal(load_digits_split("test").images, test.images)
    with pytest.raises(DfqError, match="split"):
        load_digits_split("validation")


def test_gaussian_batches_are_seeded():
    a = list(gaussian_batches(P, n_batches=2, batch_size=3, seed=0))
    b = list(gaussian_batches(P, n_batches=2, batch_size=3, seed=0))
    c = next(gaussian_batches(P, n_batches=1, batch_size=3, seed=1))
    assert len(a) == 2 and a[0].shape == (3, 3, 8, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(a[0], c)
    assert not torch.equal(a[0], a[1])


def test_subset_is_spread_over_class_sorted_data():
    images = torch.zeros(100, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(10).repeat_interleave(10)
    sub = ImageData(images, labels, [str(i) for i in range(10)]).subset(20)
    assert len(sub) == 20 and torch.equal(sub.labels.bincount(), torch.full((10,), 2))
