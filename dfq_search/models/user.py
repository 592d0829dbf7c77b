"""A user's own model, named ``package.module:function``.

The module is imported with ``importlib`` only because the user named it (never ``eval``), and
``function()`` (or ``function(num_classes=...)``) must return an ``nn.Module``. The module must be
importable: installed, or on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from dfq_search.errors import DfqError, close_matches
from dfq_search.models.base import CIFAR_PREPROCESS, ModelBundle, Preprocess, seeded_build
from dfq_search.models.preprocessing import check_input, with_overrides
from dfq_search.models.weights import load_weights

_FORM = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_FORM_TEXT = "'package.module:function', e.g. 'mymodels.cifar:build_net'"


def build_user_model(
    spec: str,
    weights: Path | None = None,
    num_classes: int | None = None,
    **preprocessing: Any,
) -> ModelBundle:
    """Import and call ``spec``; ``preprocessing`` (``input_size``, ``resize``, ``mean``, ``std``:
    :mod:`dfq_search.models.preprocessing`) defaults to 32x32 with ImageNet mean/std.

    The number of channels is the length of ``mean``; ``num_classes`` None reads the width of the
    model's output on one example input.
    """
    if not _FORM.match(spec):
        raise DfqError("bad user model name", spec, f"the form {_FORM_TEXT}", "fix the name")
    module_name, func_name = spec.split(":")
    module = _import(module_name)
    func = getattr(module, func_name, None)
    if func is None:
        hint = close_matches(func_name, dir(module))
        raise DfqError(
            f"module {module_name!r} has no attribute {func_name!r}{hint}",
            spec,
            "a function of that module that returns an nn.Module",
            "fix the function name after the ':'",
        )
    if not callable(func):
        raise DfqError("not callable", spec, "a function returning an nn.Module", "fix the name")
    if num_classes is not None and not _accepts_num_classes(func):
        raise DfqError(
            f"{spec} takes no num_classes argument",
            num_classes,
            "num_classes only for functions with a 'num_classes' parameter",
            "drop num_classes, or add the parameter to the function",
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = seeded_build(lambda: func(**kwargs))  # seeded, like every registered model
    if not isinstance(model, nn.Module):
        raise DfqError(
            f"{spec} did not return an nn.Module",
            type(model).__name__,
            "a torch.nn.Module instance",
            "make the function return the model (e.g. 'return Net()')",
        )
    preprocess = with_overrides(CIFAR_PREPROCESS, preprocessing)
    if weights is not None:
        load_weights(model, weights, name=spec)
    model.eval()
    classes = num_classes if num_classes is not None else _output_width(model, preprocess, spec)
    return ModelBundle(model, preprocess, spec, classes)


def _accepts_num_classes(func: Callable[..., object]) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): let the call decide
        return True
    return any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        inner = exc.name not in (None, module_name) and not module_name.startswith(f"{exc.name}.")
        raise DfqError(
            f"cannot import {module_name!r}"
            + (f" (it imports {exc.name!r}, which is missing)" if inner else ""),
            module_name,
            "a module that is installed or on PYTHONPATH",
            "install the missing package" if inner else "add its folder to PYTHONPATH",
        ) from exc


def _output_width(model: nn.Module, preprocess: Preprocess, spec: str) -> int:
    out = check_input(model, preprocess, spec)  # the model is still on CPU here
    if out.dim() != 2:
        raise DfqError(
            f"{spec} output is not [batch, classes]",
            tuple(out.shape),
            "a classifier returning logits of shape [N, num_classes]",
            "return logits from forward",
        )
    return int(out.shape[1])
