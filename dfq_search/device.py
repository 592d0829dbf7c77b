"""Device selection: CPU by default, CUDA only when asked for and present."""

from __future__ import annotations

import torch

from dfq_search.errors import DfqError


def resolve_device(name: str = "cpu") -> torch.device:
    """``torch.device(name)`` after checking that it exists on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DfqError("bad device", name, "'cpu', 'cuda' or 'cuda:N'", "pass --device cpu") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DfqError("unsupported device", name, "'cpu', 'cuda' or 'cuda:N'", "pass --device cpu")
    if not torch.cuda.is_available():
        raise DfqError(
            "CUDA device asked for but no GPU is available", name, "'cpu' on this machine",
            "pass --device cpu (or run on a machine with a CUDA GPU)",
        )  # fmt: skip
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DfqError(
            "no such CUDA device", name, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            "pick an existing GPU index",
        )  # fmt: skip
    return device
