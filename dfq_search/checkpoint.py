"""Quantized-model checkpoints: the model's name, its bit plan, the quantizer config and the weights.

Loaded with ``torch.load(..., weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from dfq_search.cache import atomic_write
from dfq_search.errors import DfqError
from dfq_search.models.base import Preprocess
from dfq_search.models.preprocessing import given, recorded
from dfq_search.quant import BitPlan, QuantConfig, quantize_

FORMAT = "dfq_search.quantized/1"


def save_quantized(
    path: str | Path, model: nn.Module, model_name: str, num_classes: int, plan: BitPlan,
    config: QuantConfig, preprocess: Preprocess | None = None,
) -> Path:  # fmt: skip
    """Write ``model`` (quantized by ``plan`` and ``config``) atomically to ``path``; ``preprocess``
    (the model's input size and normalization) is kept so a user model is rebuilt with it."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "model": model_name,
        "num_classes": num_classes,
        "plan": plan.to_dict(),
        "config": asdict(config),
        "state_dict": model.state_dict(),
        "preprocess": None if preprocess is None else recorded(preprocess),
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_quantized(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a quantized model saved by :func:`save_quantized`; returns (model, metadata)."""
    from dfq_search.models import create_model

    path = Path(path)
    if not path.is_file():
        raise DfqError("checkpoint not found", str(path), "an existing file", "check the path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DfqError(
            "not a dfq_search checkpoint (or it holds code, which is refused)", str(path),
            f"a file written by 'dfq-search quantize' ({type(err).__name__})", "pass such a file",
        ) from None  # fmt: skip
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DfqError("not a dfq_search checkpoint", str(path), f"format {FORMAT}", "pass such a file")
    bundle = create_model(
        payload["model"], num_classes=payload["num_classes"], **given(payload.get("preprocess") or {})
    )
    plan, config = BitPlan(payload["plan"]), QuantConfig(**payload["config"])
    model = quantize_(bundle.model, plan, bundle.preprocess.example_input(), config)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), {**payload, "preprocess": bundle.preprocess, "plan": plan}
