"""Reconstruction units of any BatchNorm CNN, and capture of their inputs and outputs.

Walk the model from its root, expanding ``nn.Sequential`` / ``nn.ModuleList`` containers; every other
child that holds a Conv2d/Linear layer is a unit (a residual block is one unit; a bare conv or linear
layer, such as a stem or a head, is a unit alone). Units are ordered by the forward pass; whatever
runs between them (BN, ReLU, pooling, shortcuts outside blocks) stays outside and needs no case.

Inputs and outputs are captured with hooks during a full forward pass, cut short by an exception
once the wanted tensor is seen, so only the prefix of the model runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfq_search.errors import DfqError
from dfq_search.ptq.calibrate import acts_disabled
from dfq_search.quant.layers import QUANTIZABLE


@dataclass(frozen=True)
class Unit:
    """A reconstruction unit: a module path, its Conv2d/Linear layers, its type.

    ``feeds_next`` is True when its output tensor is itself the input of the next unit (nothing runs
    between them), so the two can be reconstructed jointly as one chain.
    """

    name: str
    layers: tuple[str, ...]
    kind: str
    feeds_next: bool


def _candidates(model: nn.Module) -> list[str]:
    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                walk(child, full + ".")
            elif any(isinstance(m, QUANTIZABLE) for m in child.modules()):
                found.append(full)

    walk(model, "")
    return found


@torch.no_grad()
def find_units(model: nn.Module, example: Tensor) -> list[Unit]:
    """The units of ``model`` in forward order (one forward on ``example``, quantizers off)."""
    names = _candidates(model)
    seen: list[tuple[str, Tensor, Tensor]] = []

    def hook(name: str):
        return lambda m, args, out: seen.append((name, args[0], out))

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with acts_disabled(model):
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    called = [s[0] for s in seen]
    twice = sorted({n for n in called if called.count(n) > 1})
    if twice:
        raise DfqError(
            "a module runs more than once per forward pass", twice[0],
            "units that run once (no weight sharing)", "reconstruct a model without shared modules",
        )  # fmt: skip
    units = []
    for i, (name, _, out) in enumerate(seen):
        module = model.get_submodule(name)
        layers = tuple(
            f"{name}.{n}" if n else name for n, m in module.named_modules() if isinstance(m, QUANTIZABLE)
        )
        feeds = i + 1 < len(seen) and seen[i + 1][1] is out
        units.append(Unit(name, layers, type(module).__name__, feeds))
    return units


def unit_names_check(units: Sequence[Unit], names: Sequence[str]) -> None:
    """Refuse unit names the model does not have (before any compute)."""
    known = [u.name for u in units]
    for n in names:
        if n not in known:
            from dfq_search.errors import close_matches

            raise DfqError(
                f"the model has no unit{close_matches(n, known)}", n, f"units: {', '.join(known)}",
                "use unit names from the list",
            )  # fmt: skip


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, unit: str, batches: Sequence[Tensor], where: str) -> Tensor:
    """The input (``where="input"``) or output of module ``unit`` on every batch, concatenated.

    Runs ``model`` only up to that point (a hook stops the forward pass); ``model`` stays in eval.
    """
    assert where in ("input", "output"), where
    module = model.get_submodule(unit)
    got: list[Tensor] = []

    def pre(m: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise _Stop

    def post(m: nn.Module, args: tuple, out: Tensor) -> None:
        got.append(out.detach())
        raise _Stop

    handle = module.register_forward_pre_hook(pre) if where == "input" else module.register_forward_hook(post)
    model.eval()
    try:
        for x in batches:
            with contextlib.suppress(_Stop):
                model(x)
    finally:
        handle.remove()
    return torch.cat(got)


@torch.no_grad()
def unit_errors(q: nn.Module, p: nn.Module, units: Sequence[Unit], batches: Sequence[Tensor]) -> list[float]:
    """Relative error ‖Q_u(x̃) − P_u(x)‖² / ‖P_u(x)‖² of every unit's output, Q running its own prefix."""
    num = [0.0] * len(units)
    den = [0.0] * len(units)
    outs: dict[str, Tensor] = {}

    def keep(name: str):
        return lambda m, args, out: outs.__setitem__(name, out.detach())

    handles = []
    try:
        for model in (p, q):
            handles += [model.get_submodule(u.name).register_forward_hook(keep(u.name)) for u in units]
        p.eval()
        q.eval()
        for x in batches:
            p(x)
            ref = dict(outs)
            q(x)
            for i, u in enumerate(units):
                num[i] += float((outs[u.name] - ref[u.name]).pow(2).sum())
                den[i] += float(ref[u.name].pow(2).sum())
    finally:
        for h in handles:
            h.remove()
    return [n / max(d, 1e-12) for n, d in zip(num, den, strict=True)]
