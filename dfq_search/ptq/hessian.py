"""HAWQ-V3's sensitivity, data-free: the Hessian trace of each layer's weights (Hutchinson's estimator)
on synthetic images, times the weight's quantization perturbation.

The loss is the model's divergence from its own full-precision outputs, ``KL(softmax P(x) ‖ softmax
f_W(x))`` with P's outputs held fixed: no label is needed, it is 0 at W = P's weights, and its Hessian
there is P's Fisher information on x (positive semi-definite). With δ_i = Q_k(W_i) − W_i and the
second-order expansion, the loss the quantization of layer i alone costs is about

    Ω_i(k) = ½ · Tr(H_i) / n_i · ‖δ_i‖²

(HAWQ-V3's average-trace approximation of ½ δᵀ H_i δ; n_i the layer's parameters), in the same unit
as ZeroQ's Ω (KL, nats), so the two allocations read alike. Tr(H_i) = E_v[vᵀ H_i v] over Rademacher v:
one Hessian-vector product per probe and batch gives every layer's block at once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfq_search.errors import DfqError
from dfq_search.ptq.calibrate import as_batches
from dfq_search.quant.plan import check_bits
from dfq_search.quant.quantizers import WeightQuantizer
from dfq_search.quant.trace import trace_layers


def hessian_traces(
    model: nn.Module,
    batches: Iterable,
    probes: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Tr(H_i) / n_i, the mean diagonal of the Hessian of the self-KL (module docstring) with respect
    to each Conv2d/Linear layer's weight, averaged over ``probes`` Rademacher vectors per batch.
    ``model`` is left untouched."""
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise DfqError("Hutchinson probes", probes, "an int >= 1", "pass e.g. 8")
    data = as_batches(batches, device)
    p = copy.deepcopy(model).eval()
    names = [i.name for i in trace_layers(p, data[0][:1])]
    weights = [p.get_submodule(n).weight for n in names]
    for param in p.parameters():
        param.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums, count = [0.0] * len(weights), 0
    for x in data:
        with torch.no_grad():
            target = F.log_softmax(p(x), 1)
        loss = F.kl_div(F.log_softmax(p(x), 1), target, log_target=True, reduction="batchmean")
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        for _ in range(probes):
            vs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]
            hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
            for i, (v, h) in enumerate(zip(vs, hv, strict=True)):
                sums[i] += float((v * h).sum())
        count += probes
    return {n: max(s / count, 0.0) / w.numel() for n, s, w in zip(names, sums, weights, strict=True)}


@torch.no_grad()
def hawq_sensitivity(
    model: nn.Module, traces: dict[str, float], bits: Sequence[int] = (2, 3, 4, 8)
) -> dict[str, dict[int, float]]:
    """Ω_i(k) = ½ · traces[i] · ‖Q_k(W_i) − W_i‖² for every layer of ``traces`` and every k in ``bits``
    (the weight quantized per output channel with an MSE-searched range, as ZeroQ's sensitivity)."""
    for k in bits:
        check_bits(k, "sensitivity bits")
    out: dict[str, dict[int, float]] = {}
    for name, trace in traces.items():
        w = model.get_submodule(name).weight.detach()
        out[name] = {
            k: 0.5 * trace * float((WeightQuantizer(k, w.shape[0], "mse").quantize(w) - w).pow(2).sum())
            for k in bits
        }
    return out
