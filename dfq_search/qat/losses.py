"""Q's losses on detached samples, each a named term with a weight (ALGORITHMS.md §4, §5, §6).

z_p = P(x) (detached), z_q = Q(x), y the samples' labels, T a temperature.

- ``entropy`` (AdaDFQ): −T² · mean entropy(softmax((z_p − z_q)/T)); maximal when z_q = z_p + const.
- ``kd``: T² · KL(softmax(z_p/T) ‖ softmax(z_q/T)), batch mean.
- ``dkd`` (decoupled KD): b = [p_y, 1 − p_y], p̂ = softmax over the non-target classes;
  α·KL(b_P ‖ b_Q)·T² + β·KL(p̂_P ‖ p̂_Q)·T², with its own α, β, T.
- ``ce``: CE(z_q, y).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class QLossParams:
    temperature: float = 20.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_temperature: float = 4.0


def entropy_loss(z_p: Tensor, z_q: Tensor, y: Tensor, p: QLossParams) -> Tensor:
    logp = F.log_softmax((z_p - z_q) / p.temperature, dim=1)
    return -(p.temperature**2) * (-(logp.exp() * logp).sum(1)).mean()


def kd_loss(z_p: Tensor, z_q: Tensor, y: Tensor, p: QLossParams) -> Tensor:
    t = p.temperature
    return (
        F.kl_div(F.log_softmax(z_q / t, 1), F.log_softmax(z_p / t, 1), reduction="batchmean", log_target=True)
        * t
        * t
    )


def _binary_kl(pp: Tensor, pq: Tensor) -> Tensor:
    """KL([pp, 1−pp] ‖ [pq, 1−pq]) per sample."""
    eps = 1e-8
    pp, pq = pp.clamp(eps, 1 - eps), pq.clamp(eps, 1 - eps)
    return pp * (pp / pq).log() + (1 - pp) * ((1 - pp) / (1 - pq)).log()


def dkd_loss(z_p: Tensor, z_q: Tensor, y: Tensor, p: QLossParams) -> Tensor:
    t = p.dkd_temperature
    target = F.one_hot(y, z_p.shape[1]).bool()
    pt_p = F.softmax(z_p / t, 1)[target]
    pt_q = F.softmax(z_q / t, 1)[target]
    tckd = _binary_kl(pt_p, pt_q).mean()
    masked_p, masked_q = (z_p / t).masked_fill(target, -1e9), (z_q / t).masked_fill(target, -1e9)
    log_hat_q = F.log_softmax(masked_q, 1)
    hat_p = F.softmax(masked_p, 1)
    nckd = (hat_p * (F.log_softmax(masked_p, 1) - log_hat_q)).masked_fill(target, 0).sum(1).mean()
    return (p.dkd_alpha * tckd + p.dkd_beta * nckd) * t * t


Q_TERMS: dict[str, Callable[[Tensor, Tensor, Tensor, QLossParams], Tensor]] = {
    "entropy": entropy_loss,
    "kd": kd_loss,
    "dkd": dkd_loss,
    "ce": lambda z_p, z_q, y, p: F.cross_entropy(z_q, y),
}


def q_objective(
    weights: dict[str, float], z_p: Tensor, z_q: Tensor, y: Tensor, params: QLossParams
) -> tuple[Tensor, dict[str, float]]:
    """Σ_k w_k term_k(z_p.detach(), z_q, y) and the values of the terms."""
    z_p = z_p.detach()
    values = {name: Q_TERMS[name](z_p, z_q, y, params) for name in weights}
    total = sum((w * values[n] for n, w in weights.items()), torch.zeros((), device=z_q.device))
    return total, {k: float(v.detach()) for k, v in values.items()}
