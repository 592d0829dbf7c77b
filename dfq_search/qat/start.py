"""Where Q starts: round-to-nearest calibrated on Gaussian noise, or ranges left to track in the game."""

from __future__ import annotations

import torch
from torch import nn

from dfq_search.data.image_data import gaussian_batches
from dfq_search.errors import DfqError
from dfq_search.quant import BitPlan, QuantConfig, calibrate_, quantized_copy

STARTS = ("rtn", "track")


def start_q(
    p: nn.Module, plan: BitPlan, input_shape: tuple[int, int, int], config: QuantConfig | None = None,
    start: str = "rtn", calib_images: int = 256, seed: int = 0, device: torch.device | str = "cpu",
) -> nn.Module:  # fmt: skip
    """A quantized copy of ``p`` (P untouched) ready for the game.

    ``rtn``: activation ranges observed on ``calib_images`` Gaussian images, then frozen. ``track``:
    ranges left unobserved; the game tracks them on its samples during its first Q steps, then
    freezes them (GDFQ's practice). Any other quantized model can be given to :class:`Game` directly.
    """
    if start not in STARTS:
        raise DfqError("Q start", start, f"one of {STARTS}", "pass start='rtn' or 'track'")
    example = torch.zeros(1, *input_shape, device=device)
    q = quantized_copy(p, plan, example, config).eval()
    if start == "rtn":
        batch = 64
        shape_prep = _Shape(input_shape)
        calibrate_(q, gaussian_batches(shape_prep, -(-calib_images // batch), batch, seed, device), device)
    return q


class _Shape:
    """The one attribute of a Preprocess that gaussian_batches reads."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = tuple(shape)
