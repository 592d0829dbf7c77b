"""scikit-learn's 8x8 digits (it ships inside the sklearn wheel) as uint8 1-channel images.

One deterministic split serves both training the default ``digits_cnn`` and evaluating it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from dfq_search.data.image_data import ImageData
from dfq_search.errors import DfqError

SPLITS = ("train", "test")
TEST_FRACTION = 0.3
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _split() -> dict[str, ImageData]:
    """Stratified 70/30 split with seed 0; pixels 0..16 scaled to uint8 0..255."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    idx_train, idx_test = train_test_split(
        np.arange(len(images)),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    classes = [str(c) for c in range(10)]
    return {
        split: ImageData(
            torch.from_numpy(images[idx]), torch.from_numpy(digits.target[idx].astype(np.int64)), classes
        )
        for split, idx in (("train", idx_train), ("test", idx_test))
    }


def load_digits_split(split: Literal["train", "test"]) -> ImageData:
    """The ``train`` (70%) or ``test`` (30%) part of the digits, always the same images."""
    if split not in SPLITS:
        raise DfqError("unknown digits split", split, f"one of {SPLITS}", "pass 'train' or 'test'")
    return _split()[split]
