"""Block reconstruction (BRECQ), with QDrop and learned activation step sizes, ALGORITHMS.md §7.

Units (or chains of adjacent units, for ModCap) are reconstructed in forward order. For a chain
u_i..u_j: its input x̃ is captured from Q (whose earlier units are already reconstructed and hard
rounded), its target y from P's output of u_j on the same images; then, with one Adam optimiser
over the AdaRound variables V of every layer in the chain (and the step sizes of its activation
quantizers), ``iters × (j − i + 1)`` steps (a chain keeps its units' budget) minimise

    ‖Q_chain(x̃) − y‖²  (summed over channels, averaged over the batch and positions)
    + λ · Σ_layers Σ (1 − |2h(V) − 1|^β)    (β annealed, none during the warm-up).

QDrop: during these steps every activation quantizer of the chain passes each element through
unquantized with probability ``qdrop``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfq_search.ptq.adaround import attach_adaround_, beta_at, finalize_adaround_
from dfq_search.ptq.config import ReconConfig
from dfq_search.quant.layers import QUANT_LAYERS
from dfq_search.quant.quantizers import ActQuantizer


@dataclass(frozen=True)
class ChainRecord:
    """What one reconstructed chain did: its units, loss (reconstruction term) before/after, seconds;
    ``reused``: loaded from an earlier run's identical reconstruction (:mod:`dfq_search.ptq.reuse`)."""

    units: tuple[str, ...]
    loss_before: float
    loss_after: float
    seconds: float
    reused: bool = False


def rec_loss(out: Tensor, target: Tensor) -> Tensor:
    """‖out − target‖² summed over channels (dim 1), averaged over everything else."""
    return (out - target).pow(2).sum(1).mean()


class Chain(nn.Module):
    """Units applied one after another (they feed each other directly)."""

    def __init__(self, units: Sequence[nn.Module]) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)

    def forward(self, x: Tensor) -> Tensor:
        for u in self.units:
            x = u(x)
        return x


@contextlib.contextmanager
def qdrop(quants: Sequence[ActQuantizer], prob: float, gen: torch.Generator) -> Iterator[None]:
    """Inside the block, each quantizer keeps the float value of an element with probability ``prob``."""

    def mix(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
        keep = torch.rand(out.shape, generator=gen, device=gen.device) < prob
        return torch.where(keep.to(out.device), args[0], out)

    handles = [q.register_forward_hook(mix) for q in quants] if prob > 0 else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def chain_loss(chain: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """The reconstruction term on all stored activations (mean over batches)."""
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        total += float(rec_loss(chain(xb), yb)) * len(xb)
    return total / len(x)


@contextlib.contextmanager
def _only_training(params: Sequence[Tensor], model: nn.Module) -> Iterator[None]:
    """Freeze every parameter of ``model`` except ``params``; restore the flags after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    for p, _ in saved:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def reconstruct_chain_(
    units: Sequence[nn.Module], names: Sequence[str], x: Tensor, y: Tensor, config: ReconConfig
) -> ChainRecord:
    """Reconstruct the layers of ``units`` (a chain of Q's modules) so that they map ``x`` to ``y``."""
    start = time.perf_counter()
    if x.dim() == 4:  # see AdaRoundWeightQuantizer: channels_last makes the backward pass fast on CPU
        x = x.contiguous(memory_format=torch.channels_last)
    chain = Chain(units).eval()
    layers = [m for m in chain.modules() if isinstance(m, QUANT_LAYERS)]
    quants = [m for m in chain.modules() if isinstance(m, ActQuantizer) and m.enabled and bool(m.frozen)]
    before = chain_loss(chain, x, y)
    adas = [attach_adaround_(layer) for layer in layers]
    groups = [{"params": [a.v for a in adas], "lr": config.lr}]
    if config.act_lr > 0 and quants:
        groups.append({"params": [q.scale for q in quants], "lr": config.act_lr})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator(device=x.device).manual_seed(config.seed)
    iters = config.iters * len(units)  # a merged chain keeps the step budget of its units
    with _only_training([p for g in groups for p in g["params"]], chain):
        for step in range(iters):
            idx = torch.randint(0, len(x), (config.batch_size,), generator=gen, device=x.device)
            with qdrop(quants, config.qdrop, gen):
                loss = rec_loss(chain(x[idx]), y[idx])
            beta = beta_at(step, iters, config.b_start, config.b_end, config.warmup)
            if beta is not None and config.lam > 0:
                loss = loss + config.lam * sum(a.regularizer(beta) for a in adas)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for layer in layers:
        finalize_adaround_(layer)
    after = chain_loss(chain, x, y)
    return ChainRecord(tuple(names), before, after, time.perf_counter() - start)
