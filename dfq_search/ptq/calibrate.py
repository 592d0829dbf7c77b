"""Calibration of a quantized model Q: activation ranges, MSE weight ranges, BatchNorm statistics.

Activation ranges, per tensor, from the inputs each ``ActQuantizer`` sees (with every activation
quantizer switched off, so the ranges describe Q's float activations under quantized weights):

- ``minmax``: the smallest and largest value over all batches;
- ``percentile``: the (100 − p)-th and p-th percentiles of a random sample of the values;
- ``mse``: the clipping of the min/max range, shrunk by ``1 − 0.01 i`` (i < 100), with the least
  mean squared quantization error on that sample (Banner et al.; BRECQ's activation init).

Each range is set with ``ActQuantizer.set_range`` (which freezes it into a learnable step size).
Weight ranges are MSE-searched by the weight quantizers themselves (``method="mse"``, L_2.4) on the
first forward pass, which calibration runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from dfq_search.errors import DfqError
from dfq_search.ptq.config import ACT_RANGES
from dfq_search.quant.quantizers import ActQuantizer, qparams

SAMPLES = 1 << 16  # values kept per quantizer, over all batches, for percentile/MSE


def as_batches(batches: Iterable, device: torch.device | str = "cpu") -> list[Tensor]:
    """The input tensors of ``batches`` (tensors or (inputs, labels) pairs) on ``device``, as a list.

    Zero batches is refused: nothing could be calibrated or reconstructed.
    """
    out = [(b[0] if isinstance(b, (tuple, list)) else b).to(device) for b in batches]
    if not out:
        raise DfqError("calibration batches", 0, "at least one batch", "give calibration data")
    return out


@contextlib.contextmanager
def acts_disabled(model: nn.Module) -> Iterator[list[ActQuantizer]]:
    """Switch every activation quantizer off inside the block; restore their flags after."""
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    flags = [q.enabled for q in quants]
    for q in quants:
        q.enabled = False
    try:
        yield quants
    finally:
        for q, flag in zip(quants, flags, strict=True):
            q.enabled = flag


def mse_act_range(x: Tensor, bits: int, steps: int = 100, p: float = 2.0) -> tuple[float, float]:
    """The shrink of [min, max] by ``1 − 0.01 i`` (i < steps) with the least mean ``|x − x̂|^p``."""
    lo0, hi0 = x.min().clamp(max=0), x.max().clamp(min=0)
    ratios = 1.0 - 0.01 * torch.arange(steps, dtype=x.dtype, device=x.device)
    scale, zp = qparams(lo0 * ratios, hi0 * ratios, bits)  # [steps]
    errs = torch.stack([
        ((((x / s).round() + z).clamp(0, 2**bits - 1) - z) * s - x).abs().pow(p).mean()
        for s, z in zip(scale, zp, strict=True)
    ])  # fmt: skip
    best = int(errs.argmin())
    return float(lo0 * ratios[best]), float(hi0 * ratios[best])


def _range(samples: Tensor, lo: float, hi: float, bits: int, method: str, pct: float) -> tuple[float, float]:
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        qs = torch.quantile(samples, torch.tensor([1 - pct / 100, pct / 100]))
        return float(qs[0]), float(qs[1])
    return mse_act_range(samples, bits)


@torch.no_grad()
def calibrate_ranges_(
    q: nn.Module,
    batches: Iterable,
    method: str = "mse",
    percentile: float = 99.99,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> int:
    """Set the range of every activation quantizer of ``q`` by ``method``; returns the batches seen."""
    if method not in ACT_RANGES:
        raise DfqError("act_range", method, f"one of {ACT_RANGES}", "pick one")
    data = as_batches(batches, device)
    gen = torch.Generator().manual_seed(seed)
    stats: dict[ActQuantizer, list] = {}
    per_batch = -(-SAMPLES // len(data))

    def record(module: ActQuantizer, args: tuple) -> None:
        x = args[0].detach().flatten().float()
        pick = torch.randint(0, x.numel(), (min(per_batch, x.numel()),), generator=gen)
        lo, hi, samples = stats.setdefault(module, [float("inf"), float("-inf"), []])
        stats[module][:2] = [min(lo, float(x.min())), max(hi, float(x.max()))]
        samples.append(x[pick.to(x.device)].cpu())

    q.eval()
    with acts_disabled(q) as quants:
        handles = [m.register_forward_pre_hook(record) for m in quants]
        try:
            for x in data:
                q(x)
        finally:
            for h in handles:
                h.remove()
    for m, (lo, hi, samples) in stats.items():
        m.set_range(*_range(torch.cat(samples), lo, hi, m.bits, method, percentile))
    return len(data)


@torch.no_grad()
def reestimate_bn_(q: nn.Module, batches: Iterable, device: torch.device | str = "cpu") -> int:
    """Replace the running statistics of Q's BatchNorms by those of Q on ``batches`` (§11).

    Activation quantizers are off meanwhile (calibrate their ranges afterwards); the statistics are
    the plain average over the batches (momentum None). Q must not share BN modules with P (a
    :func:`dfq_search.quant.quantized_copy` does not). Returns the batches seen.
    """
    data = as_batches(batches, device)
    bns = [m for m in q.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    q.eval()
    try:
        with acts_disabled(q):
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for x in data:
                q(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()
    return len(data)
