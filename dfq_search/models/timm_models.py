"""timm classifiers, named ``timm:<name>`` (the optional extra ``[timm]``), built with
``pretrained=False`` and loaded from a local file only: nothing is downloaded. The preprocessing is
the model's ``pretrained_cfg`` (input size, mean, std; the resize before the center crop is
``input size / crop_pct``), which timm knows without fetching any weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dfq_search.errors import DfqError, unknown_name
from dfq_search.models.base import ModelBundle, Preprocess, seeded_build
from dfq_search.models.weights import load_weights

PREFIX = "timm:"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise DfqError("timm models need the timm package", "timm", "timm installed (the [timm] extra)",
                       "pip install -e '.[timm]' (or pip install timm)") from None  # fmt: skip
    return timm


def timm_preprocess(cfg: dict[str, Any]) -> Preprocess:
    """The preprocessing of a timm ``pretrained_cfg``."""
    channels, size = int(cfg["input_size"][0]), int(cfg["input_size"][-1])
    crop = cfg.get("crop_pct")
    resize = round(size / crop) if crop else None
    return Preprocess(size, resize, tuple(cfg["mean"]), tuple(cfg["std"]), channels=channels)


def build_timm(name: str, weights: Path | None = None, num_classes: int | None = None) -> ModelBundle:
    """timm model ``name`` (random init with seed 0, or ``weights`` loaded strictly)."""
    timm = _timm()
    if not timm.is_model(name):
        raise unknown_name("timm model", name, timm.list_models(), "pass one of timm.list_models()")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = seeded_build(lambda: timm.create_model(name, pretrained=False, **kwargs))
    for m in model.modules():  # in-place activations would change a tensor a forward hook has seen
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    if weights is not None:
        load_weights(model, weights, name=f"{PREFIX}{name}")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.setdefault("input_size", (3, 224, 224))
    cfg.setdefault("mean", (0.485, 0.456, 0.406))
    cfg.setdefault("std", (0.229, 0.224, 0.225))
    return ModelBundle(model.eval(), timm_preprocess(cfg), f"{PREFIX}{name}", int(model.num_classes))
