"""Sample (generator) losses, each a named term with a weight (ALGORITHMS.md §1, §3, §4, §5, §6).

Every term reads one :class:`SampleBatch`: the samples x, labels y, P's logits z_p and the statistics
its hooks recorded during the ONE forward of P that all terms share, and Q's logits z_q when a term
needs them. ``L_G = Σ_k w_k · term_k(batch)``.

- ``bns``:   L_BNS over batch statistics (σ² or, with ``use_std``, σ).
- ``bns_sample``: the same with each sample's own statistics (ZeroQ), averaged over samples.
- ``sda``:   DSG slack alignment Σ_l mean ‖max(|μ̃−μ|−δ_l, 0)‖² + mean ‖max(|σ̃−σ|−γ_l, 0)‖², averaged
             over layers; δ_l, γ_l from :func:`slack_from_noise`.
- ``lse``:   SDA on per-sample statistics, weighted by (I + 11ᵀ): sample j's term on layer j mod L counts
             twice (DSG's layerwise enhancement).
- ``sci``:   DSG correlation inhibition ‖eig(ΦΦᵀ) − eig(Φ_nΦ_nᵀ)‖² / B / L, Φ the L2-normalised
             flattened batch, Φ_n a Gaussian batch of the same shape (a fixed seeded reference).
- ``ce``:    CE(z_p, y).
- ``ama``:   LRQ adversarial margin add: CE over s·cos θ_j with the target logit s·cos(θ_y + m), where
             cos θ_j = W_j·f / (‖W_j‖‖f‖), f = P's penultimate feature, W = P's last linear weight.
- ``margin``:    AdaDFQ mean relu(λ_l − H') + mean relu(H' − λ_u), H' the normalised entropy of
                 softmax(z_p − z_q) (:func:`normalized_disagreement`).
- ``disagree``:  CE(softmax(z_p − z_q), y);  ``agree``: CE(softmax(z_p + z_q), y).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfq_search.synth.bn import BNStats, bn_loss, bn_statistics, sample_bn_loss


@dataclass
class SampleBatch:
    """What the loss terms read; ``z_q`` only when a term needs Q, ``feature`` only for ``ama``."""

    x: Tensor
    y: Tensor
    z_p: Tensor
    stats: BNStats | None
    z_q: Tensor | None = None
    feature: Tensor | None = None
    head_weight: Tensor | None = None
    n_layers: int = 1  # BN layers of P (SCI is divided by it)


@dataclass
class TermKnobs:
    """Knobs of the terms (weights live apart): see the module docstring for each symbol."""

    use_std: bool = False
    slack_eps: float = 0.9
    lambda_l: float = 0.1
    lambda_u: float = 0.8
    ama_margin: float = 0.2
    ama_scale: float = 10.0


@dataclass
class TermParams(TermKnobs):
    """The knobs plus what is computed from P at run time (DSG's per-layer slack)."""

    slack: dict[str, Tensor] = field(default_factory=dict)  # "delta", "gamma": [L] per-layer slack


def normalized_disagreement(z_p: Tensor, z_q: Tensor) -> Tensor:
    """H' = (H − min_batch H) / (log C − min_batch H) ∈ [0, 1], H = entropy(softmax(z_p − z_q))."""
    logp = F.log_softmax(z_p - z_q, dim=1)
    h = -(logp.exp() * logp).sum(1)
    h_min = h.min().detach()
    return (h - h_min) / (math.log(z_p.shape[1]) - h_min).clamp(min=1e-8)


def _std(var: Tensor) -> Tensor:
    return (var + 1e-5).sqrt()


def _sda_terms(mean: Tensor, var: Tensor, r, delta: Tensor, gamma: Tensor) -> Tensor:
    """Hinged mean and std gaps of one layer, averaged over the channel axis (the last)."""
    dm = ((mean - r.running_mean).abs() - delta).clamp(min=0).pow(2).mean(-1)
    ds = ((_std(var) - _std(r.running_var)).abs() - gamma).clamp(min=0).pow(2).mean(-1)
    return dm + ds


def _slack(params: TermParams, n_layers: int, device) -> tuple[Tensor, Tensor]:
    if not params.slack:  # no slack computed: SDA reduces to plain (σ-based) alignment
        zero = torch.zeros(n_layers, device=device)
        return zero, zero
    return params.slack["delta"].to(device), params.slack["gamma"].to(device)


def sda_loss(b: SampleBatch, p: TermParams) -> Tensor:
    delta, gamma = _slack(p, len(b.stats), b.x.device)
    terms = [_sda_terms(r.mean, r.var, r, delta[i], gamma[i]) for i, r in enumerate(b.stats.records)]
    return torch.stack(terms).mean()


def lse_loss(b: SampleBatch, p: TermParams) -> Tensor:
    delta, gamma = _slack(p, len(b.stats), b.x.device)
    cols = [
        _sda_terms(r.sample_mean, r.sample_var, r, delta[i], gamma[i]) for i, r in enumerate(b.stats.records)
    ]
    per = torch.stack(cols, dim=1)  # [B, L]
    n_layers = per.shape[1]
    boost = F.one_hot(torch.arange(per.shape[0], device=per.device) % n_layers, n_layers)
    return (per * (1 + boost)).sum(1).mean() / n_layers


_NOISE_SPECTRA: dict[tuple[int, int], Tensor] = {}


def noise_spectrum(batch: int, dim: int) -> Tensor:
    """Sorted eigenvalues of ΦΦᵀ for a seeded Gaussian batch [batch, dim], Φ row-normalised (cached)."""
    key = (batch, dim)
    if key not in _NOISE_SPECTRA:
        noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0))
        phi = F.normalize(noise, dim=1)
        _NOISE_SPECTRA[key] = torch.linalg.eigvalsh(phi @ phi.T)
    return _NOISE_SPECTRA[key]


def sci_loss(b: SampleBatch, p: TermParams) -> Tensor:
    phi = F.normalize(b.x.flatten(1), dim=1)
    eig = torch.linalg.eigvalsh(phi @ phi.T)
    ref = noise_spectrum(*phi.shape).to(eig.device)
    return (eig - ref).pow(2).mean() / b.n_layers


def ama_loss(b: SampleBatch, p: TermParams) -> Tensor:
    assert b.feature is not None and b.head_weight is not None, "ama needs P's penultimate feature"
    cos = F.normalize(b.feature, dim=1) @ F.normalize(b.head_weight, dim=1).T
    theta_y = cos.gather(1, b.y[:, None]).clamp(-1 + 1e-6, 1 - 1e-6).acos()
    target = torch.cos(theta_y + p.ama_margin)
    logits = cos.scatter(1, b.y[:, None], target) * p.ama_scale
    return F.cross_entropy(logits, b.y)


def margin_loss(b: SampleBatch, p: TermParams) -> Tensor:
    assert b.z_q is not None
    h = normalized_disagreement(b.z_p, b.z_q)
    return F.relu(p.lambda_l - h).mean() + F.relu(h - p.lambda_u).mean()


TERMS: dict[str, Callable[[SampleBatch, TermParams], Tensor]] = {
    "bns": lambda b, p: bn_loss(b.stats, p.use_std),
    "bns_sample": lambda b, p: sample_bn_loss(b.stats, p.use_std).mean(),
    "sda": sda_loss,
    "lse": lse_loss,
    "sci": sci_loss,
    "ce": lambda b, p: F.cross_entropy(b.z_p, b.y),
    "ama": ama_loss,
    "margin": margin_loss,
    "disagree": lambda b, p: F.cross_entropy(b.z_p - b.z_q, b.y),
    "agree": lambda b, p: F.cross_entropy(b.z_p + b.z_q, b.y),
}
NEEDS_Q = frozenset({"margin", "disagree", "agree"})
NEEDS_SAMPLE_STATS = frozenset({"lse", "bns_sample"})
NEEDS_FEATURE = frozenset({"ama"})


@torch.no_grad()
def slack_from_noise(
    model: nn.Module, input_shape: tuple[int, ...], eps: float = 0.9, batches: int = 8, batch_size: int = 32,
    seed: int = 0, device: torch.device | str = "cpu",
) -> dict[str, Tensor]:  # fmt: skip
    """DSG's per-layer slack δ_l, γ_l: the ε-quantile of the chance fluctuation of batch statistics.

    P sees ``batches`` Gaussian batches; for each BN layer the per-channel batch mean μ_k and std σ_k
    deviate from their average over the batches by |μ_k − μ̄|, |σ_k − σ̄|; δ_l (γ_l) is the ε-quantile
    of those deviations over batches and channels. So a generated batch is not pushed closer to the
    running statistics than batches of one fixed distribution differ from each other by chance.
    """
    gen = torch.Generator().manual_seed(seed)
    means: list[list[Tensor]] = []
    stds: list[list[Tensor]] = []
    with bn_statistics(model) as stats:
        for _ in range(batches):
            model(torch.randn(batch_size, *input_shape, generator=gen).to(device))
            means.append([r.mean for r in stats.records])
            stds.append([_std(r.var) for r in stats.records])
    out = {}
    for key, vals in (("delta", means), ("gamma", stds)):
        per_layer = []
        for layer in zip(*vals, strict=True):  # K tensors of [C_l]
            stacked = torch.stack(layer)
            per_layer.append(torch.quantile((stacked - stacked.mean(0)).abs().flatten(), eps))
        out[key] = torch.stack(per_layer).cpu()
    return out
