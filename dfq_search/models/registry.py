"""Models by name: ``register_model``, ``list_models``, ``create_model``.

A name is one of

* a registered name (``list_models()``), e.g. ``cifar_resnet20``, ``resnet18``, ``tiny_cnn``;
* ``tv:<name>`` for any torchvision classification model, e.g. ``tv:efficientnet_b0``;
* ``timm:<name>`` for any timm model (the optional extra ``[timm]``), e.g. ``timm:efficientnet_lite0``;
* ``package.module:function`` for a user's model: the module is imported (only because the user
  named it) and ``function(num_classes=...)`` must return an ``nn.Module``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from dfq_search.errors import DfqError, unknown_name
from dfq_search.models.base import ModelBundle


class ModelFactory(Protocol):
    """A registered builder: the model on CPU, weights loaded from ``weights`` when given.

    ``num_classes`` None means the model's default head. The returned model may be in any mode;
    ``create_model`` moves it to the device and puts it in eval mode.
    """

    def __call__(self, weights: Path | None, num_classes: int | None) -> ModelBundle: ...


_REGISTRY: dict[str, ModelFactory] = {}
TV_PREFIX = "tv:"


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers ``factory`` under ``name``; a name already taken raises."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise DfqError(
                "model name already registered",
                name,
                f"a name not among the {len(_REGISTRY)} registered ones",
                "pick another name for the new model",
            )
        if not name or ":" in name:
            raise DfqError("bad model name", name, "a non-empty name without ':'", "rename the model")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models(pattern: str | None = None) -> list[str]:
    """The registered names, sorted; ``pattern`` filters with shell wildcards (``cifar_*``)."""
    names = sorted(_REGISTRY)
    return fnmatch.filter(names, pattern) if pattern else names


def create_model(
    name: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
    **preprocessing: Any,
) -> ModelBundle:
    """Build model ``name`` on ``device`` in eval mode, loading ``weights`` when given.

    ``weights`` None means random init (seeded where the model says so), except for models with a
    built-in default such as ``digits_cnn``. ``preprocessing`` (``input_size``, ``resize``, ``mean``,
    ``std``; None: the model's own) sets the input of a user's or a torchvision model; a model
    registered with fixed weights accepts only its own values (:mod:`dfq_search.models.preprocessing`).
    """
    from dfq_search.models import preprocessing as prep

    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise DfqError("bad num_classes", num_classes, "None or an int >= 1", "pass e.g. 10")
    unknown = sorted(set(preprocessing) - set(prep.KEYS))
    if unknown:
        raise DfqError("create_model options", unknown, f"preprocessing keys {prep.KEYS}", "drop them")
    path = None if weights is None else Path(weights).expanduser()
    fixed = False
    if ":" in name and not name.startswith((TV_PREFIX, "timm:")):
        from dfq_search.models.user import build_user_model

        bundle = build_user_model(name, path, num_classes, **prep.given(preprocessing))
    elif name.startswith("timm:"):
        from dfq_search.models.timm_models import build_timm

        bundle = build_timm(name.removeprefix("timm:"), path, num_classes)
    elif name.startswith(TV_PREFIX):
        from dfq_search.models.torchvision_models import build_torchvision

        bundle = build_torchvision(name.removeprefix(TV_PREFIX), path, num_classes)
        bundle.name = name  # what rebuilds it (checkpoints, campaigns): tv:<name>
    elif name in _REGISTRY:
        bundle = _REGISTRY[name](path, num_classes)
        fixed = not getattr(_REGISTRY[name], "any_input", False)
    else:
        raise unknown_name(
            "model",
            name,
            _REGISTRY,
            "pass a registered name, 'tv:<torchvision name>' or 'package.module:function'",
        )
    bundle = prep.apply(bundle, preprocessing, fixed)
    bundle.model.to(device).eval()
    return bundle
