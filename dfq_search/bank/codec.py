"""How synthetic pixels are stored: float16 (the default) or uint8 with a per-channel range.

Generator outputs live in P's normalised input space (GDFQ ends in a BatchNorm without affine), so
they are unbounded reals, not 0..255 pixels. ``float16`` keeps them to a relative error of 2^-11 at
two bytes a value; ``uint8`` maps each channel's [min, max] over the shard to 0..255 at one byte a
value. The measurement behind the default is in ``benchmarks/buffer.py --codec-check``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dfq_search.errors import DfqError

ENCODINGS = ("float16", "uint8")


def check_encoding(name: str) -> str:
    if name not in ENCODINGS:
        raise DfqError("pixel encoding", name, f"one of {ENCODINGS}", "pass pixels='float16' or 'uint8'")
    return name


def encode(x: Tensor, encoding: str) -> tuple[np.ndarray, list[list[float]] | None]:
    """``x`` [N, C, H, W] float -> (bytes-ready array [N, C*H*W*k], per-channel range or None)."""
    x = x.detach().to("cpu", torch.float32)
    if check_encoding(encoding) == "float16":
        return x.to(torch.float16).reshape(len(x), -1).view(torch.uint8).numpy(), None
    lo = x.amin(dim=(0, 2, 3))
    hi = torch.maximum(x.amax(dim=(0, 2, 3)), lo + 1e-8)
    scale = (hi - lo).view(1, -1, 1, 1)
    u = ((x - lo.view(1, -1, 1, 1)) / scale * 255).round().clamp(0, 255).to(torch.uint8)
    return u.reshape(len(x), -1).numpy(), [lo.tolist(), hi.tolist()]


def decode(
    raw: np.ndarray, shape: tuple[int, ...], encoding: str, value_range: list[list[float]] | None
) -> Tensor:
    """The inverse of :func:`encode`: [N, C, H, W], float16 for ``float16``, float32 for ``uint8``."""
    n = len(raw)
    if check_encoding(encoding) == "float16":
        return torch.from_numpy(np.ascontiguousarray(raw)).view(torch.float16).reshape(n, *shape)
    lo, hi = (torch.tensor(v).view(1, -1, 1, 1) for v in value_range)
    u = torch.from_numpy(np.ascontiguousarray(raw)).reshape(n, *shape).float()
    return lo + u / 255 * (hi - lo)
