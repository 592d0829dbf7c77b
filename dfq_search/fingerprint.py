"""Content hashes that tie synthetic samples to the model and the generator config that made them.

``model_fingerprint(P)`` hashes P's architecture (every leaf module's class and the settings that shape
what it computes) and every entry of its state dict (name, dtype, shape, bytes), so two models agree
exactly when they compute the same function from the same code shape. Not the modules' reprs: those
change between torch versions (2.14 added ``bias=True`` to BatchNorm's), and a bank made on a cluster
must still match the same model on a laptop with another torch.

``config_hash(obj)`` hashes any JSON-able config (dataclasses included) with sorted keys, so field
order and formatting do not matter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch
from torch import nn

DIGITS = 16  # hex digits kept: 64 bits, ample against accidental collisions of a user's few models


# The settings of torch.nn modules that change their function beyond the state dict's shapes; the rest
# of their attributes (flags like ``inplace``, counts the shapes give) are left out, and so is whatever
# a later torch adds. A module outside torch.nn (the user's own) is described by all its public settings.
# fmt: off
FUNCTIONAL = frozenset({
    "stride", "padding", "dilation", "groups", "padding_mode", "kernel_size", "output_padding", "eps",
    "ceil_mode", "count_include_pad", "divisor_override", "return_indices", "output_size",
    "negative_slope", "approximate", "min_val", "max_val", "lambd", "threshold", "value", "beta",
    "upper", "lower", "scale_factor", "size", "mode", "align_corners", "dim", "start_dim", "end_dim",
    "p", "alpha",
})
# fmt: on
_PLAIN = (bool, int, float, str, type(None))


def _plain_value(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def _settings(module: nn.Module) -> str:
    own = not type(module).__module__.startswith("torch.")
    kept = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in vars(module).items()
        if not k.startswith("_") and k != "training" and (own or k in FUNCTIONAL) and _plain_value(v)
    }
    return ", ".join(f"{k}={kept[k]!r}" for k in sorted(kept))


def architecture(model: nn.Module) -> str:
    """The model's structure as text: ``name: Class(settings)`` of every leaf module, in order."""
    lines = [type(model).__qualname__]
    for name, module in model.named_modules():
        if not list(module.children()):
            lines.append(f"{name}: {type(module).__qualname__}({_settings(module)})")
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
