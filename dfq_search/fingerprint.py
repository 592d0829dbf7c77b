"""Content hashes that tie synthetic samples to the model and the generator config that made them.

``model_fingerprint(P)`` hashes P's architecture (the module tree with every layer's repr) and every
entry of its state dict (name, dtype, shape, bytes), so two models agree exactly when they compute the
same function from the same code shape. ``config_hash(obj)`` hashes any JSON-able config (dataclasses
included) with sorted keys, so field order and formatting do not matter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch import nn

DIGITS = 16  # hex digits kept: 64 bits, ample against accidental collisions of a user's few models


def architecture(model: nn.Module) -> str:
    """The model's structure as text: ``name: repr`` of every leaf module, in registration order."""
    lines = [type(model).__qualname__]
    for name, module in model.named_modules():
        if not list(module.children()):
            lines.append(f"{name}: {module!r}")
    return "\n".join(lines)


def model_fingerprint(model: nn.Module) -> str:
    """A hex hash of ``model``'s architecture and state dict (parameters and buffers)."""
    h = hashlib.sha256(architecture(model).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:DIGITS]


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (tuple, set)):
        return sorted(obj) if isinstance(obj, set) else list(obj)
    return str(obj)


def config_hash(config: Any) -> str:
    """A hex hash of a JSON-able config (dicts, lists, numbers, dataclasses), independent of key order."""
    text = json.dumps(config, sort_keys=True, default=_plain, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGITS]
