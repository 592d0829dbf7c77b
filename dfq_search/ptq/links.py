"""Which modules of a model feed which: chains of leaf modules, each one's output the next one's only input.

A *leaf* is a module that units are made of: a Conv2d/Linear layer, a *block* (a module with its own
forward that holds such layers: a residual block, an inverted residual, a squeeze-and-excitation
block), or a module without such layers (BatchNorm, an activation, pooling, dropout, flatten, ...).
Containers are opened:

- an ``nn.Sequential`` (whose forward is Sequential's) is one chain of its children's leaves;
- the children of an ``nn.ModuleList`` / ``nn.ModuleDict`` are separate chains (the parent's forward
  decides their order);
- the model's own forward, when it is not Sequential's, is traced with torch.fx, every submodule a
  leaf of the trace: a call is linked to the one before when it takes that call's output as its only
  argument and nothing else reads that output (``F.relu``, a reshape or an addition in between
  break the link). Where fx cannot trace the forward (control flow on tensor values, ...), or the
  trace calls into blocks, the model's children are separate chains and a warning says so.

A module object that runs at two places (a shared ReLU) splits the chain there: a hook on it could
not tell its calls apart.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from dfq_search.quant.layers import QUANTIZABLE

log = logging.getLogger(__name__)

Chain = list[str]


def is_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` that runs its children in order (not a subclass with its own forward)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict)) and type(module).forward is nn.Module.forward


def holds_layers(module: nn.Module) -> bool:
    """The module is, or holds, a Conv2d/Linear layer."""
    return any(isinstance(m, QUANTIZABLE) for m in module.modules())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def expand(path: str, module: nn.Module) -> list[Chain]:
    """The chains of leaves of ``module`` (at ``path``) when it is called once (a list: its children)."""
    if is_sequential(module):
        chains: list[Chain] = [[]]
        for name, child in module._modules.items():  # duplicates too: named_children() skips them
            if child is None:
                continue
            inner = expand(_join(path, name), child)
            if is_sequential(child) or not _is_list(child):
                chains[-1] += inner[0]
            else:  # a ModuleList inside a Sequential cannot run; keep its leaves, unlinked
                chains += [*inner, []]
        return [c for c in chains if c]
    if _is_list(module):
        return [c for name, child in module._modules.items() if child is not None
                for c in expand(_join(path, name), child)]  # fmt: skip
    return [[path]]


def _tree(model: nn.Module) -> list[Chain]:
    """Chains from the module tree alone: each child of a custom-forward model is separate."""
    if is_sequential(model) or _is_list(model):
        return expand("", model)
    return [c for name, child in model._modules.items() if child is not None for c in expand(name, child)]


def _traced(model: nn.Module) -> list[Chain]:
    """Chains of the model's own forward, from a torch.fx trace whose leaves are its submodules."""
    import torch.fx

    class Shallow(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return True

    graph = Shallow().trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module"]
    count = Counter(n.target for n in calls)
    chains: list[Chain] = []
    listed: set[str] = set()
    prev = None
    for node in calls:
        module = model.get_submodule(node.target)
        if node.target in listed or _is_list(module):  # a second call of a shared module: listed once
            prev = None
            continue
        listed.add(node.target)
        inner = expand(node.target, module)
        if not inner:  # an empty Sequential
            continue
        linked = (
            prev is not None and node.args == (prev,) and not node.kwargs and len(prev.users) == 1
            and count[node.target] == count[prev.target] == 1
        )  # fmt: skip
        prev = node if len(inner) == 1 else None
        if linked:
            chains[-1] += inner.pop(0)
        chains += inner
    return chains


def _split_shared(model: nn.Module, chains: list[Chain]) -> list[Chain]:
    """Cut every chain at a module without layers that runs at more than one place."""
    uses = Counter(id(model.get_submodule(p)) for c in chains for p in c)
    out: list[Chain] = []
    for chain in chains:
        out.append([])
        for path in chain:
            module = model.get_submodule(path)
            if uses[id(module)] > 1 and not holds_layers(module):
                out.append([])
            else:
                out[-1].append(path)
    return [c for c in out if c]


def leaf_chains(model: nn.Module) -> list[Chain]:
    """The model's leaves as chains of linked calls (see the module docstring), in no particular order."""
    tree = _tree(model)
    if is_sequential(model) or _is_list(model):
        return _split_shared(model, tree)
    try:
        chains = _traced(model)
    except Exception as err:  # fx raises many kinds (TraceError, TypeError, ...) on untraceable code
        log.warning(
            "units: torch.fx cannot trace %s.forward (%s: %s); its children are units alone, so "
            "conv-BN-activation layers written as its attributes are reconstructed layer by layer",
            type(model).__name__, type(err).__name__, err,
        )  # fmt: skip
        return _split_shared(model, tree)
    tree_leaves = {p for c in tree for p in c}
    stray = [p for c in chains for p in c if p not in tree_leaves]
    if stray:
        log.warning(
            "units: %s.forward calls %s inside a block; its children are units alone",
            type(model).__name__, stray[0],
        )  # fmt: skip
        return _split_shared(model, tree)
    traced = {p for c in chains for p in c}
    chains += [[p] for c in tree for p in c if p not in traced]  # never called by forward: alone
    return _split_shared(model, chains)
