"""Loading a weights file into a model: safely (``weights_only``), strictly, with clear errors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from dfq_search.errors import DfqError

PREFIX = "module."  # added by nn.DataParallel / DistributedDataParallel when saving
_NBT = "num_batches_tracked"


def read_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """The state dict in ``path``: a plain state dict or a dict with a ``state_dict`` entry.

    ``torch.load(..., weights_only=True)`` refuses pickles that would run code, so a hostile file
    fails here instead of executing. A ``module.`` prefix on the keys is stripped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "weights path is a directory" if path.is_dir() else "weights file not found"
        raise DfqError(what, str(path), "an existing checkpoint file", "check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise DfqError(
            "not a loadable torch checkpoint",
            str(path),
            "a file saved with torch.save holding only tensors and plain containers "
            f"(loading with weights_only=True failed: {type(exc).__name__}: {_first_line(exc)})",
            "save the weights with torch.save(model.state_dict(), path); files that would run "
            "code when loaded are refused",
        ) from exc
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise DfqError(
            "checkpoint holds no state dict",
            str(path),
            "a dict of tensors, or a dict whose 'state_dict' entry is one",
            "save the weights with torch.save(model.state_dict(), path)",
        )
    state = OrderedDict((k.removeprefix(PREFIX), v) for k, v in ckpt.items())
    metadata = getattr(ckpt, "_metadata", None)
    if metadata is not None:  # per-module versions, which BatchNorm reads when loading
        state._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == "module" else k.removeprefix(PREFIX), v) for k, v in metadata.items()
        )
    return state


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    name: str,
    hint: Callable[[Mapping[str, torch.Tensor]], str] | None = None,
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` with ``strict=True``; returns ``model``.

    Keys and shapes are compared first so a mismatch is one readable error that lists the first
    differences; ``hint(state_dict)`` may add a guess at what the file is (e.g. another depth).
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    # Checkpoints from before PyTorch 0.4.1 lack BatchNorm's num_batches_tracked; torch's strict
    # load fills it in for them, so its absence is not a mismatch.
    missing = [k for k in expected if k not in state and not k.endswith(_NBT)]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label} {len(items)}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatches (file vs model)", shapes),
            )
            if items
        ]
        guess = hint(state) if hint else ""
        raise DfqError(
            f"weights do not match {name}{guess}",
            str(path),
            "a state dict with exactly the model's keys and shapes; " + "; ".join(parts),
            "pass the weights file trained for this architecture, or the model name they fit",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DfqError(
            f"weights do not load into {name}",
            str(path),
            f"a state dict that loads with strict=True ({_first_line(exc)})",
            "pass the weights file trained for this architecture",
        ) from exc
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
