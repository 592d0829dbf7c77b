"""Reconstruction units of any BatchNorm CNN, and capture of their inputs and outputs.

A unit is a run of modules that follow each other in the computation (each one's output the next
one's only input, see :mod:`dfq_search.ptq.links`): a Conv2d/Linear layer or a block (a module with
its own forward holding such layers: residual, inverted-residual, squeeze-and-excitation blocks),
then the BatchNorm and activation modules that follow it (conv -> BN -> act is one unit); modules
that only pass values on (pooling, dropout, flatten, ...) between two units join the second, so
consecutive units feed each other. Two exceptions and one pairing:

- the first and last layers of the model, when they are bare layers, are units alone, their BN and
  activation outside (BRECQ, ALGORITHMS.md section 7; a ResNet's units stay conv1, its blocks, linear);
- a depthwise conv run followed by a pointwise (1x1) conv run is one depthwise-separable unit
  (MobileNetV1's block): a depthwise and a pointwise layer differ in topology (per-channel spatial
  filter vs channel mixing, parameters 9C vs C*C'), so they are not alike for ModCap, while two
  separable blocks are.

A unit's ``kind`` (what ModCap compares) is the type of its layer or block and of the BN/activation
modules after it, e.g. "Conv2d+BatchNorm2d+ReLU6", "Conv2d[dw]+BatchNorm2d+ReLU6+Conv2d+BatchNorm2d+
ReLU6", "BasicBlock": strides, kernel sizes and pooling do not count (ModCap pairs a block with the
down-sampling block after it).

Inputs and outputs are captured with hooks during a full forward pass, cut short by an exception
once the wanted tensor is seen, so only the prefix of the model runs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfq_search.errors import DfqError
from dfq_search.ptq.calibrate import acts_disabled
from dfq_search.ptq.links import expand, holds_layers, is_sequential, leaf_chains
from dfq_search.quant.layers import QUANTIZABLE

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d)  # fmt: skip


@dataclass(frozen=True)
class Unit:
    """A reconstruction unit.

    name: from its layer or block and the BN/activation after it (the pass-through modules before
        them are not named): the path of the one module (``layer1.0``, ``conv1``); of the
        ``nn.Sequential`` they fill (``features.1``); else ``<parent>.<first>..<last>`` for children
        of one Sequential (``features.3..5``, both ends included) or ``<first path>..<last path>``
        (module names cannot hold "..", so the name is never mistaken for a path).
    modules: the paths of its modules in call order, each one's output the next one's input.
    layers: the paths of its Conv2d/Linear layers.
    kind: its type signature (see the module docstring); alike units have the same kind.
    feeds_next: its output tensor is itself the input of the next unit (nothing runs between them),
        so the two can be reconstructed jointly as one chain.
    """

    name: str
    modules: tuple[str, ...]
    layers: tuple[str, ...]
    kind: str
    feeds_next: bool


@dataclass
class _Run:
    modules: list[str]
    core: list[str]  # the layer or block and its BN/activation: what the kind describes
    linked: bool  # the modules after it (up to the next unit of its chain) belong to the next unit
    paired: bool = False


def _completes(module: nn.Module) -> bool:
    """A BatchNorm (or other norm) or an activation module: the end of a conv-BN-act run."""
    if holds_layers(module):
        return False
    return isinstance(module, NORMS) or any(
        c.__module__ == "torch.nn.modules.activation" for c in type(module).__mro__
    )


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and tuple(module.kernel_size) == (1, 1)


def _runs(model: nn.Module, chain: list[str], alone: set[str]) -> list[_Run]:
    """Cut one chain of linked leaves into units (see the module docstring)."""
    runs: list[_Run] = []
    between: list[str] = []
    i = 0
    while i < len(chain):
        if not holds_layers(model.get_submodule(chain[i])):
            between.append(chain[i])
            i += 1
            continue
        core = [chain[i]]
        i += 1
        while core[0] not in alone and i < len(chain) and _completes(model.get_submodule(chain[i])):
            core.append(chain[i])
            i += 1
        lead = between if runs and runs[-1].linked else []
        run = _Run(lead + core, core, core[0] not in alone)
        prev = runs[-1] if runs else None
        if (prev is not None and prev.linked and run.linked and not prev.paired
                and _depthwise(model.get_submodule(prev.core[0]))
                and _pointwise(model.get_submodule(core[0]))):  # fmt: skip
            runs[-1] = _Run(prev.modules + run.modules, prev.core + core, True, paired=True)
        else:
            runs.append(run)
        between = []
    return runs


def _kind(module: nn.Module) -> str:
    if isinstance(module, QUANTIZABLE):  # QuantConv2d is a Conv2d: P and Q have the same kinds
        base = next(c for c in type(module).__mro__ if c in QUANTIZABLE).__name__
        return base + ("[dw]" if _depthwise(module) else "")
    return type(module).__name__


def _name(model: nn.Module, modules: list[str]) -> str:
    if len(modules) == 1:
        return modules[0]
    parts = modules[0].split(".")
    for k in range(1, len(parts)):  # the outermost Sequential made of exactly these modules
        prefix = ".".join(parts[:k])
        seq = model.get_submodule(prefix)
        if is_sequential(seq) and expand(prefix, seq) == [modules]:
            return prefix
    parent, _, first = modules[0].rpartition(".")
    last_parent, _, last = modules[-1].rpartition(".")
    if parent == last_parent:
        return f"{parent}.{first}..{last}" if parent else f"{first}..{last}"
    return f"{modules[0]}..{modules[-1]}"


def _layers(model: nn.Module, modules: Sequence[str]) -> tuple[str, ...]:
    return tuple(
        f"{path}.{n}" if n else path
        for path in modules
        for n, m in model.get_submodule(path).named_modules()
        if isinstance(m, QUANTIZABLE)
    )


Calls = dict[str, list[list]]  # path -> [start index, input, output] of every call


@contextlib.contextmanager
def _calls(model: nn.Module, paths: Sequence[str]):
    """Record every call of the modules at ``paths`` (start order, input, output) inside the block."""
    calls: Calls = {p: [] for p in paths}
    counter = itertools.count()

    def pre(path: str):
        return lambda m, args: calls[path].append([next(counter), args[0] if args else None, None])

    def post(path: str):
        return lambda m, args, out: calls[path][-1].__setitem__(2, out)

    handles = []
    try:
        for p in calls:
            module = model.get_submodule(p)
            handles += [module.register_forward_pre_hook(pre(p)), module.register_forward_hook(post(p))]
        yield calls
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def find_units(model: nn.Module, example: Tensor) -> list[Unit]:
    """The units of ``model`` in forward order (one forward on ``example``, quantizers off)."""
    chains = leaf_chains(model)
    layer_paths = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    leaves = [p for c in chains for p in c]
    was_training = model.training
    model.eval()
    try:
        with _calls(model, [*leaves, *layer_paths]) as calls, acts_disabled(model):
            model(example)
    finally:
        model.train(was_training)
    order = sorted((c[0][0], p) for p in layer_paths if (c := calls[p]))
    alone = {order[0][1], order[-1][1]} if order else set()
    found = []
    for run in (r for chain in chains for r in _runs(model, chain, alone)):
        first, last = calls[run.modules[0]], calls[run.modules[-1]]
        if not first:
            continue  # never runs in forward
        twice = [p for p in run.modules if len(calls[p]) > 1]
        if twice:
            raise DfqError(
                "a module runs more than once per forward pass", twice[0],
                "units that run once (no weight sharing)", "reconstruct a model without shared modules",
            )  # fmt: skip
        kind = "+".join(_kind(model.get_submodule(p)) for p in run.core)
        found.append((first[0][0], first[0][1], last[0][2], run, kind))
    found.sort(key=lambda f: f[0])
    units = []
    for i, (_, _, out, run, kind) in enumerate(found):
        feeds = i + 1 < len(found) and found[i + 1][1] is out
        name = _name(model, run.core)
        units.append(Unit(name, tuple(run.modules), _layers(model, run.modules), kind, feeds))
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
def capture(model: nn.Module, unit: Unit | str, batches: Sequence[Tensor], where: str) -> Tensor:
    """The input (``where="input"``) or output of ``unit`` (a Unit or a module path) on every batch,
    concatenated: the input of its first module or the output of its last.

    Runs ``model`` only up to that point (a hook stops the forward pass); ``model`` stays in eval.
    """
    assert where in ("input", "output"), where
    paths = (unit,) if isinstance(unit, str) else unit.modules
    module = model.get_submodule(paths[0] if where == "input" else paths[-1])
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
            handles += [model.get_submodule(u.modules[-1]).register_forward_hook(keep(u.name)) for u in units]
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
