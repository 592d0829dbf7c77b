"""BatchNorm-statistics hooks on P and the BN-statistics alignment loss (ALGORITHMS.md §1).

Forward hooks on every ``_BatchNorm`` of P record, per channel, the mean and the biased variance of
the BN *input* of the current batch (one fused ``var_mean`` per layer), and optionally the same
statistics per sample (over the spatial positions only, as ZeroQ / DSG's LSE need). The moments
have a fused backward (:class:`_Moments`), so the hooks add little to a generator step.

    L_BNS = (1/L) Σ_l  mean_c (μ_lc − running_mean_lc)² + mean_c (σ²_lc − running_var_lc)²

With ``use_std`` the second term compares σ with sqrt(running_var) (ZeroQ's variant). With ``relative``
both terms are measured in units of the layer's own spread, per channel c (σ²_r = running_var):

    (μ_lc − μ_r,lc)² / σ²_r,lc   and   ((σ²_lc − σ²_r,lc) / σ²_r,lc)²   (or ((σ_lc − σ_r,lc) / σ_r,lc)²)

so the loss does not depend on the scale of a layer's activations: a network whose BN inputs have
variances of 0.1 (mnist_dwnet) weighs its layers, and the loss against the image priors, as one whose
variances are 10 does (the absolute form lets small-variance layers and models go unmatched). Hooks live only
inside :func:`bn_statistics`, a context manager that always removes them, even after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dfq_search.errors import DfqError


@dataclass
class BNRecord:
    """Statistics of one BN layer's input for the last batch; ``sample_*`` are [B, C] when recorded."""

    name: str
    running_mean: Tensor
    running_var: Tensor
    mean: Tensor | None = None
    var: Tensor | None = None
    sample_mean: Tensor | None = None
    sample_var: Tensor | None = None


@dataclass
class BNStats:
    """What the hooks collected during the last forward: one :class:`BNRecord` per BN layer, in order."""

    records: list[BNRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def clear(self) -> None:
        for r in self.records:
            r.mean = r.var = r.sample_mean = r.sample_var = None


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm of ``model`` that tracks running statistics, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def require_bn(model: nn.Module, what: str = "a BN-statistics loss") -> list[tuple[str, _BatchNorm]]:
    """The BN layers of ``model``; a user error when it has none."""
    layers = bn_layers(model)
    if not layers:
        raise DfqError(
            f"{what} needs a model with BatchNorm", type(model).__name__,
            "a model with at least one BatchNorm layer that tracks running statistics",
            "use a BN model, or drop the BN terms (set their weights to 0)",
        )  # fmt: skip
    return layers


def require_bn_for_samples(model: nn.Module, name: str, source: str) -> None:
    """Samples synthesized from P (``direct``, ``generator``) match its BatchNorm statistics: a model
    without BatchNorm (ConvNeXt's LayerNorm, a ViT) is refused before any compute, saying why."""
    if source in ("direct", "generator") and not bn_layers(model):
        norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        has = f"it has {', '.join(norms)}" if norms else "it has no normalization layers"
        raise DfqError(
            f"{name} has no BatchNorm for {source} samples to match", source,
            f"a BatchNorm CNN: data-free samples are synthesized from its BN statistics ({has})",
            "quantize it with real images (--samples real:DIR, or --calib DIR with --method rtn), "
            "gaussian samples or a bank",
        )  # fmt: skip


class _Moments(torch.autograd.Function):
    """Mean and biased variance over ``dims`` (kept), with a fused hand-written backward.

    Forward: m = E[x], v = E[x²] − m² (clamped at 0). Backward, for n reduced elements:
    ∂L/∂x = g_m / n + 2 (x − m) g_v / n = x · a + c with a = 2 g_v / n, c = g_m / n − a·m: one
    ``addcmul``. ``torch.var_mean`` over (N, H, W) costs more than the convolution feeding it on CPU
    (forward and backward), which would make the hooks dominate a generator step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        m = x.mean(dims, keepdim=True)
        v = (x.square().mean(dims, keepdim=True) - m.square()).clamp_(min=0.0)
        ctx.save_for_backward(x, m)
        ctx.n = x.numel() // m.numel()
        return m, v

    @staticmethod
    def backward(ctx, g_m: Tensor, g_v: Tensor) -> tuple[Tensor, None]:
        x, m = ctx.saved_tensors
        a = g_v * (2.0 / ctx.n)
        return torch.addcmul(g_m / ctx.n - a * m, x, a), None


def moments(x: Tensor, per_sample: bool = False) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of ``x`` [N, C, ...]: shapes [C], or [N, C] per sample."""
    dims = tuple(range(2, x.dim())) if per_sample else (0, *range(2, x.dim()))
    if not dims:  # [N] input of a BatchNorm1d over features: nothing to reduce per sample
        return x, torch.zeros_like(x)
    m, v = _Moments.apply(x, dims)
    shape = (x.shape[0], x.shape[1]) if per_sample else (x.shape[1],)
    return m.reshape(shape), v.reshape(shape)


@contextmanager
def bn_statistics(model: nn.Module, per_sample: bool = False, batch: bool = True) -> Iterator[BNStats]:
    """Record the input statistics of every BN layer of ``model`` while the block runs.

    ``batch``: record μ and σ² over (N, H, W); ``per_sample``: over (H, W) for each sample. The hooks
    are removed on exit, whatever happens inside the block.
    """
    layers = require_bn(model)
    stats = BNStats([BNRecord(n, m.running_mean, m.running_var) for n, m in layers])
    handles = []

    def make_hook(rec: BNRecord):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0]
            if batch:
                rec.mean, rec.var = moments(x)
            if per_sample:
                rec.sample_mean, rec.sample_var = moments(x, per_sample=True)

        return hook

    try:
        for (_, m), rec in zip(layers, stats.records, strict=True):
            handles.append(m.register_forward_pre_hook(make_hook(rec)))
        yield stats
    finally:
        for h in handles:
            h.remove()


def _spread(var: Tensor, running_var: Tensor, use_std: bool, eps: float) -> Tensor:
    """σ² − running σ², or σ − running σ (ZeroQ) with ``use_std``."""
    if use_std:
        return (var + eps).sqrt() - (running_var + eps).sqrt()
    return var - running_var


def _layer_loss(
    mean: Tensor, var: Tensor, r: BNRecord, use_std: bool, relative: bool, eps: float, floor: float = 0.0
) -> Tensor:
    """One layer's term of L_BNS (per channel, averaged over the channels; [B] for [B, C] input)."""
    spread = _spread(var, r.running_var, use_std, eps)
    shift = mean - r.running_mean
    if relative:
        scale = r.running_var if floor == 0 else torch.maximum(r.running_var, floor * r.running_var.mean())
        scale = scale + eps
        shift, spread = shift / scale.sqrt(), spread / (scale.sqrt() if use_std else scale)
    return shift.pow(2).mean(-1) + spread.pow(2).mean(-1)


def bn_loss(
    stats: BNStats, use_std: bool = False, eps: float = 1e-5, relative: bool = False, floor: float = 0.0
) -> Tensor:
    """L_BNS over the batch statistics (module docstring); 0 when they equal the running ones.
    ``floor`` (with ``relative``): a channel's unit is at least ``floor`` x its layer's mean running
    variance, so a near-dead channel (running variance ~1e-4 beside a layer mean of ~3) does not
    dominate the loss."""
    terms = []
    for r in stats.records:
        assert r.mean is not None and r.var is not None, "no batch statistics recorded"
        terms.append(_layer_loss(r.mean, r.var, r, use_std, relative, eps, floor))
    return torch.stack(terms).mean()


def sample_bn_loss(stats: BNStats, use_std: bool = False, eps: float = 1e-5) -> Tensor:
    """Per-sample, per-layer BN loss, a [B, L] matrix (ZeroQ statistics of each sample alone)."""
    cols = []
    for r in stats.records:
        assert r.sample_mean is not None and r.sample_var is not None, "no per-sample statistics"
        spread = _spread(r.sample_var, r.running_var, use_std, eps)
        cols.append((r.sample_mean - r.running_mean).pow(2).mean(1) + spread.pow(2).mean(1))
    return torch.stack(cols, dim=1)
