"""Mixed precision by sensitivity: ZeroQ's Pareto method (ALGORITHMS.md §9), a baseline for the search.

Sensitivity of layer i at k bits, on (synthetic) batches x, with only layer i's weight quantized
(per output channel, MSE-searched range) and everything else in float:

    Ω_i(k) = mean_x KL(softmax P(x) ‖ softmax P_{i←k}(x)).

Assuming additivity, the allocation for a size budget S (in weight bits) solves

    min Σ_i Ω_i(k_i)   subject to   Σ_i params_i · k_i ≤ S,

exactly, by dynamic programming over the layers keeping only the Pareto-optimal (size, Ω) states.

The same measure for a layer's activations (its input), for budgets that limit BOPs: Ω^a_i(a) is the
KL when only layer i's input is quantized at a bits (per tensor, MSE-searched range on a sample of that
input over the batches), everything else in float, so that weight and activation moves are weighed
in one unit (nats) by the budget repair and the ILP.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfq_search.errors import DfqError
from dfq_search.ptq.calibrate import SAMPLES, as_batches, mse_act_range
from dfq_search.quant.plan import BitPlan, check_bits
from dfq_search.quant.quantizers import WeightQuantizer, fake_quant, qparams
from dfq_search.quant.trace import trace_layers


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """mean over samples of KL(softmax ref ‖ softmax logits) (clamped at 0 against rounding)."""
    return max(0.0, float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(ref_logits, 1), log_target=True,
                          reduction="batchmean")))  # fmt: skip


def _float_copy(model: nn.Module, batches: Iterable, bits: Sequence[int], what: str, device) -> tuple:
    """The batches on ``device``, an eval copy of ``model`` and its logits on them (bits checked)."""
    for k in bits:
        check_bits(k, what)
    data = as_batches(batches, device)
    p = copy.deepcopy(model).eval()
    return data, p, [p(x) for x in data]


def _mean_kl(p: nn.Module, refs: Sequence[torch.Tensor], data: Sequence[torch.Tensor]) -> float:
    """The KL of ``p``'s outputs from ``refs``, averaged over every sample of ``data``."""
    kls = [_kl(r, p(x)) * len(x) for r, x in zip(refs, data, strict=True)]
    return sum(kls) / sum(len(x) for x in data)


@torch.no_grad()
def zeroq_sensitivity(
    model: nn.Module,
    batches: Iterable,
    bits: Sequence[int] = (2, 3, 4, 8),
    device: torch.device | str = "cpu",
) -> dict[str, dict[int, float]]:
    """Ω_i(k) for every Conv2d/Linear layer i of ``model`` (left untouched) and every k in ``bits``."""
    data, p, refs = _float_copy(model, batches, bits, "sensitivity bits", device)
    out: dict[str, dict[int, float]] = {}
    for info in trace_layers(p, data[0][:1]):
        layer = p.get_submodule(info.name)
        original = layer.weight.detach().clone()
        out[info.name] = {}
        for k in bits:
            layer.weight.copy_(WeightQuantizer(k, original.shape[0], "mse").quantize(original))
            out[info.name][k] = _mean_kl(p, refs, data)
        layer.weight.copy_(original)
    return out


def _input_samples(p: nn.Module, layers: Sequence[str], data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each named layer's float input values: all of them, or a seeded random sample where there
    are more than ``SAMPLES``."""
    gen, per_batch = torch.Generator().manual_seed(0), max(1, SAMPLES // len(data))
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().flatten().float()
            if x.numel() > per_batch:  # all of a small input, a sample of a large one
                x = x[torch.randint(0, x.numel(), (per_batch,), generator=gen).to(x.device)]
            kept[name].append(x)

        return record

    handles = [p.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
    try:
        for x in data:
            p(x)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in kept.items()}


@torch.no_grad()
def act_sensitivity(
    model: nn.Module,
    batches: Iterable,
    bits: Sequence[int] = (2, 3, 4, 8),
    device: torch.device | str = "cpu",
    skip: Iterable[str] = (),
) -> dict[str, dict[int, float]]:
    """Ω^a_i(a) (module docstring) for every Conv2d/Linear layer i of ``model`` (left untouched) but
    those in ``skip`` (e.g. a layer reading the model's input, which stays float), at every a in
    ``bits``."""
    data, p, refs = _float_copy(model, batches, bits, "activation sensitivity bits", device)
    names = [i.name for i in trace_layers(p, data[0][:1]) if i.name not in set(skip)]
    samples = _input_samples(p, names, data)
    out: dict[str, dict[int, float]] = {}
    for name in names:
        out[name] = {}
        for k in bits:
            lo, hi = mse_act_range(samples[name], k)
            scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), k)
            scale, zp = scale.to(samples[name].device), zp.to(samples[name].device)
            handle = p.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, s=scale, z=zp, b=k: (fake_quant(args[0], s, z, b), *args[1:])
            )
            try:
                out[name][k] = _mean_kl(p, refs, data)
            finally:
                handle.remove()
    return out


def allocate_bits(
    sensitivity: Mapping[str, Mapping[int, float]], params: Mapping[str, int], budget_bits: float
) -> dict[str, int]:
    """The bits per layer minimising Σ Ω_i(k_i) with Σ params_i · k_i ≤ ``budget_bits`` (exact DP).

    A layer whose sensitivity lists one bit width only is pinned to it.
    """
    names = list(sensitivity)
    least = sum(params[n] * min(sensitivity[n]) for n in names)
    if least > budget_bits:
        raise DfqError(
            "size budget below the smallest model", budget_bits, f"at least {least} weight bits",
            "raise the budget or allow fewer bits",
        )  # fmt: skip
    states: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for n in names:
        grown = [(s + params[n] * k, c + om, (*ch, k)) for s, c, ch in states
                 for k, om in sensitivity[n].items() if s + params[n] * k <= budget_bits]  # fmt: skip
        grown.sort(key=lambda t: (t[0], t[1]))
        states = []
        for st in grown:  # keep the Pareto front: strictly lower cost as size grows
            if not states or st[1] < states[-1][1]:
                states.append(st)
    best = min(states, key=lambda t: (t[1], t[0]))
    return dict(zip(names, best[2], strict=True))


def sensitivity_plan(
    model: nn.Module,
    batches: Iterable,
    avg_bits: float,
    act_bits: int = 4,
    bits: Sequence[int] = (2, 3, 4, 8),
    pinned: Mapping[str, int] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[BitPlan, dict[str, dict[int, float]]]:
    """ZeroQ's bit plan for a budget of ``avg_bits`` weight bits per parameter (``pinned`` layers, e.g.
    the first and last at 8 bits, keep their bits and count in the budget). Returns (plan, Ω)."""
    check_bits(act_bits, "act_bits")
    data = as_batches(batches, device)
    infos = trace_layers(model, data[0][:1])
    pinned = dict(pinned or {})
    sens = zeroq_sensitivity(model, data, bits, device)
    for n, k in pinned.items():
        sens[n] = {check_bits(k, n): 0.0}
    params = {i.name: i.params for i in infos}
    chosen = allocate_bits(sens, params, avg_bits * sum(params.values()))
    plan = BitPlan({n: {"w": k, "a": pinned.get(n, act_bits)} for n, k in chosen.items()})
    return plan, sens
