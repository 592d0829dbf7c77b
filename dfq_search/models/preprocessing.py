"""A model's preprocessing set by the user (``--input-size``, ``--resize``, ``--mean``, ``--std``, the
same keys in a space file's ``model:`` section, and what checkpoints and campaigns record).

A user's ``module:function`` model and a torchvision model take any preprocessing (a torchvision
classifier runs at other input sizes; a grayscale model has one mean and one std). A model registered
with fixed weights (``cifar_resnet20``, ``digits_cnn``, the panel) accepts only its own values: a
different one would feed it inputs it was never trained on, so it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from dfq_search.errors import DfqError
from dfq_search.models.base import ModelBundle, Preprocess

KEYS = ("input_size", "resize", "mean", "std")


def given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing settings of ``values`` that are set (lists as tuples)."""
    out = {k: values.get(k) for k in KEYS if values.get(k) is not None}
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in out.items()}


def recorded(pre: Preprocess) -> dict[str, Any]:
    """``pre`` as plain values for a checkpoint, a bank or a campaign (``given`` reads it back)."""
    return {"input_size": pre.input_size, "resize": pre.resize, "mean": list(pre.mean), "std": list(pre.std)}


def with_overrides(base: Preprocess, settings: Mapping[str, Any]) -> Preprocess:
    """``base`` with ``settings`` applied: the channel count follows ``mean``; a new input size keeps
    the base's resize ratio (torchvision's 256/224) unless ``resize`` is given."""
    s = given(settings)
    mean = s.get("mean", base.mean)
    std = s.get("std", base.std if len(base.std) == len(mean) else None)
    if std is None:
        raise DfqError("--mean without --std", mean, f"one std per mean ({len(mean)} values)",
                       f"pass --std with {len(mean)} value(s)")  # fmt: skip
    size = s.get("input_size", base.input_size)
    resize = s.get("resize")
    if resize is None and base.resize is not None:
        resize = base.resize if size == base.input_size else round(size * base.resize / base.input_size)
    for key, value in (("input_size", size), ("resize", resize)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise DfqError(f"--{key.replace('_', '-')}", value, "a positive integer", "pass e.g. 32")
    return Preprocess(size, resize, mean, std, channels=len(mean))


def apply(bundle: ModelBundle, settings: Mapping[str, Any], fixed: bool) -> ModelBundle:
    """``bundle`` with the user's preprocessing; refused for a ``fixed`` model when it differs from its
    own, and when the model cannot take the input it implies."""
    if not given(settings):
        return bundle
    pre = with_overrides(bundle.preprocess, settings)
    if pre == bundle.preprocess:
        return bundle
    if fixed:
        own = {k: v for k, v in recorded(bundle.preprocess).items() if k in given(settings)}
        raise DfqError(f"preprocessing that contradicts {bundle.name}", given(settings),
                       f"its own ({own}), fixed by the weights it was trained with",
                       "drop these options, or wrap the model in your own module:function")  # fmt: skip
    check_input(bundle.model, pre, bundle.name)
    return replace(bundle, preprocess=pre)


def check_input(model: torch.nn.Module, pre: Preprocess, name: str) -> torch.Tensor:
    """The model's output on two example inputs of ``pre``; a model that fails on them is refused."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.inference_mode():
            out = model(pre.example_input(2, device=device))
    except Exception as exc:
        raise DfqError(
            f"{name} failed on an input of shape {(2, *pre.shape)}", f"{type(exc).__name__}: {exc}",
            "a preprocessing the model accepts (channels = the number of --mean values)",
            "pass --input-size, --mean and --std matching the model (grayscale: --mean 0.5 --std 0.5)",
        ) from exc  # fmt: skip
    return out
