"""Reference baselines: round-to-nearest (RTN) with min/max calibration.

Two calibration sources: Gaussian noise (data-free) and real images (the real-data reference, which
bounds from above what data-free methods reach; no data-free method may read those images).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dfq_search.data.image_data import ImageData, gaussian_batches
from dfq_search.errors import DfqError
from dfq_search.models.base import Preprocess
from dfq_search.quant import BitPlan, QuantConfig, calibrate_, quantized_copy

GAUSSIAN = "gaussian"


@dataclass(frozen=True)
class CalibSpec:
    """Where calibration batches come from: ``source`` is "gaussian" or an ImageFolder directory."""

    source: str = GAUSSIAN
    n_images: int = 256
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_images", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DfqError(f"calibration {name}", value, "an int >= 1", f"pass a positive {name}")


def calibration_batches(
    spec: CalibSpec, preprocess: Preprocess, device: torch.device | str = "cpu"
) -> Iterator[Tensor]:
    """The input batches of ``spec`` (a seeded random subset of the images for a real source)."""
    if spec.source == GAUSSIAN:
        n_batches = -(-spec.n_images // spec.batch_size)
        yield from gaussian_batches(preprocess, n_batches, spec.batch_size, spec.seed, device)
        return
    from dfq_search.data.folder import load_image_folder

    data = load_image_folder(Path(spec.source), preprocess)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed))
    chosen = pick[: spec.n_images]
    subset = ImageData(data.images[chosen], data.labels[chosen], data.classes)
    for x, _ in subset.batches(preprocess, spec.batch_size, device):
        yield x


def round_to_nearest(
    model: nn.Module,
    plan: BitPlan,
    preprocess: Preprocess,
    calib: CalibSpec,
    config: QuantConfig | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A quantized copy of ``model`` under ``plan``, activation ranges calibrated on ``calib``."""
    q = quantized_copy(model, plan, preprocess.example_input(device=device), config)
    calibrate_(q, calibration_batches(calib, preprocess, device), device)
    return q
