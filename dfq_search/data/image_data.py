"""Decoded images held as one uint8 tensor, normalized on the fly for each batch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dfq_search.errors import DfqError

if TYPE_CHECKING:  # data does not import models at run time (models import data)
    from dfq_search.models.base import Preprocess


@dataclass(frozen=True)
class ImageData:
    """A labelled image set, decoded once.

    ``images`` is uint8 [N, C, H, W], already resized and cropped to the model's input size;
    ``labels`` is int64 [N] indexing ``classes``. Treat both as read-only: loaders share them
    between callers (the in-process memo hands out the same tensors).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, self.images.shape
        assert self.labels.dtype == torch.int64 and self.labels.shape == (len(self.images),)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, preprocess: Preprocess, batch_size: int = 500, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (normalized float inputs, labels) on ``device``, in order, ``batch_size`` at a time."""
        if tuple(self.images.shape[1:]) != preprocess.shape:
            raise DfqError(
                "images were decoded for another input shape",
                tuple(self.images.shape[1:]),
                f"(C, H, W) = {preprocess.shape} for this model",
                "load the data again with this model's preprocess",
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DfqError("bad batch_size", batch_size, "an int >= 1", "pass e.g. 500")
        for start in range(0, len(self), batch_size):
            x = self.images[start : start + batch_size].to(device, non_blocking=True)
            y = self.labels[start : start + batch_size].to(device, non_blocking=True)
            yield preprocess.normalize(x), y

    def subset(self, n: int) -> ImageData:
        """``n`` evenly spaced images: a class-sorted folder keeps every class in proportion."""
        if not 1 <= n <= len(self):
            raise DfqError("subset size", n, f"1 .. {len(self)}", "ask for fewer images")
        idx = torch.linspace(0, len(self) - 1, n).round().long()
        return ImageData(self.images[idx], self.labels[idx], self.classes)


def gaussian_batches(
    preprocess: Preprocess,
    n_batches: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """``n_batches`` standard-normal batches of the model's input shape, for calibration on noise.

    Drawn on CPU from a generator seeded with ``seed``, so the values do not depend on the device.
    """
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        yield torch.randn(batch_size, *preprocess.shape, generator=gen).to(device)
