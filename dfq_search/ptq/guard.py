"""A label-free guard on reconstruction: keep round-to-nearest when reconstruction lost fidelity to P.

Reconstruction lowers each unit's error to P on the calibration images. On synthetic images it can
fit those images and lose elsewhere: a depthwise grayscale MobileNet came out of data-free BRECQ worse
than its round-to-nearest (RTN, calibrated ranges) start while its per-unit errors went down. The
guard scores both models on held-out synthetic images the reconstruction never saw, with the
campaign's default label-free metric, the logits' MSE to P (:mod:`dfq_search.fidelity`):

    mse(M) = mean_{n,c} (M(x_n)_c − P(x_n)_c)²   over the held-out images x_n

Rule: the reconstructed model is kept unless mse(reconstructed) > mse(RTN), strictly; ties go to
the reconstruction (it is what was asked for, and an equal score is no evidence against it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from dfq_search.errors import DfqError
from dfq_search.fidelity import fidelity, logits

METRIC = "mse"


def heldout_images(heldout: Tensor | Iterable) -> Tensor:
    """The held-out images as one tensor: a tensor as given, or the concatenated input tensors of
    batches (tensors or (inputs, labels) pairs). No image at all is refused."""
    if isinstance(heldout, Tensor):
        images = heldout
    else:
        parts = [b[0] if isinstance(b, (tuple, list)) else b for b in heldout]
        images = torch.cat(parts) if parts else torch.empty(0)
    if images.dim() == 0 or len(images) == 0:
        raise DfqError(
            "heldout", f"{len(images) if images.dim() else 0} images", "at least one held-out image",
            "pass synthetic images the reconstruction does not see, or heldout=None for no guard",
        )  # fmt: skip
    return images


def guard(p: nn.Module, rtn: nn.Module, reconstructed: nn.Module, images: Tensor) -> dict:
    """Which of ``rtn`` and ``reconstructed`` to keep, by the rule of the module docstring.

    Returns ``{"metric": "mse", "rtn": mse(RTN), "reconstructed": mse(reconstructed), "kept":
    "reconstructed" | "rtn", "images": N}`` (MSEs of the logits to P's: lower is more faithful).
    """
    ref = logits(p, images)
    mse = {
        name: fidelity(logits(m, images), ref)[METRIC]
        for name, m in (("rtn", rtn), ("reconstructed", reconstructed))
    }
    kept = "rtn" if mse["reconstructed"] > mse["rtn"] else "reconstructed"
    return {"metric": METRIC, **mse, "kept": kept, "images": len(images)}
