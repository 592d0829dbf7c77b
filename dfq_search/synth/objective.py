"""The generator objective: weighted sample-loss terms over ONE shared forward of P (and of Q if needed).

``SampleObjective(P, weights, params)`` validates everything up front (term names, weights >= 0, the
AdaDFQ bounds, BN layers in P, a linear head for ``ama``), computes DSG's slack once when ``sda`` or
``lse`` is used, then ``objective(x, y, q)`` returns ``(L_G, metrics, z_p)``:
L_G = Σ_k w_k term_k, with P's hooks (BN statistics, penultimate feature) active during a single
forward. Terms of weight 0 are not computed, and their statistics are not collected.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dfq_search.errors import DfqError, unknown_name
from dfq_search.synth.bn import bn_layers, bn_statistics, require_bn
from dfq_search.synth.losses import (
    NEEDS_FEATURE,
    NEEDS_Q,
    NEEDS_SAMPLE_STATS,
    TERMS,
    SampleBatch,
    TermParams,
    slack_from_noise,
)

BN_TERMS = frozenset({"bns", "bns_sample", "sda", "lse"})


def check_weights(weights: Mapping[str, float], valid: Mapping, kind: str) -> dict[str, float]:
    """Known names and finite weights >= 0; returns the terms with a positive weight."""
    for name, w in weights.items():
        if name not in valid:
            raise unknown_name(kind, name, valid, "use one of the listed terms")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
            raise DfqError(f"weight of {kind} {name!r}", w, "a finite number >= 0", "pass e.g. 0.1")
    return {k: float(w) for k, w in weights.items() if w > 0}


def check_bounds(lambda_l: float, lambda_u: float) -> None:
    if not 0.0 <= lambda_l < lambda_u <= 1.0:
        raise DfqError(
            "AdaDFQ margin bounds (lambda_l, lambda_u)", (lambda_l, lambda_u),
            "0 <= lambda_l < lambda_u <= 1", "e.g. lambda_l 0.1, lambda_u 0.8",
        )  # fmt: skip


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DfqError("the 'ama' term needs a linear head", type(model).__name__,
                       "a model whose last layer is nn.Linear", "drop the ama term")  # fmt: skip
    return linears[-1]


@contextmanager
def _feature_hook(head: nn.Linear | None, box: dict) -> Iterator[None]:
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, inputs: box.__setitem__("f", inputs[0]))
    try:
        yield
    finally:
        handle.remove()


class SampleObjective:
    """L_G over P (module docstring). ``needs_q`` says whether ``__call__`` wants Q."""

    def __init__(
        self, model: nn.Module, weights: Mapping[str, float], params: TermParams | None = None,
        input_shape: tuple[int, ...] | None = None, device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        self.model, self.params = model, params or TermParams()
        self.weights = check_weights(weights, TERMS, "sample loss")
        active = set(self.weights)
        if active & {"margin"}:
            check_bounds(self.params.lambda_l, self.params.lambda_u)
        self.uses_bn = bool(active & BN_TERMS)
        if self.uses_bn:
            require_bn(model, f"the sample loss {sorted(active & BN_TERMS)}")
        self.n_layers = max(len(bn_layers(model)), 1)
        self.per_sample = bool(active & NEEDS_SAMPLE_STATS)
        self.needs_q = bool(active & NEEDS_Q)
        self.head = last_linear(model) if active & NEEDS_FEATURE else None
        if active & {"sda", "lse"} and not self.params.slack:
            if input_shape is None:
                raise DfqError("sda/lse need the input shape", None, "(C, H, W)", "pass input_shape")
            self.params.slack = slack_from_noise(model, input_shape, self.params.slack_eps, device=device)

    def __call__(self, x: Tensor, y: Tensor, q: nn.Module | None = None) -> tuple[Tensor, dict, Tensor]:
        """(L_G, {term: value}, z_p) for samples ``x`` with labels ``y``; P and Q run once each."""
        box: dict[str, Tensor] = {}
        with self._stats() as stats, _feature_hook(self.head, box):
            z_p = self.model(x)
        z_q = q(x) if self.needs_q and q is not None else None
        if self.needs_q and z_q is None:
            raise DfqError("these sample losses need Q", sorted(set(self.weights) & NEEDS_Q),
                           "a quantized model passed as q", "pass q, or drop those terms")  # fmt: skip
        batch = SampleBatch(x, y, z_p, stats, z_q, box.get("f"),
                            None if self.head is None else self.head.weight, self.n_layers)  # fmt: skip
        values = {name: TERMS[name](batch, self.params) for name in self.weights}
        total = sum((w * values[n] for n, w in self.weights.items()), torch.zeros((), device=x.device))
        return total, {k: float(v.detach()) for k, v in values.items()}, z_p

    @contextmanager
    def _stats(self):
        if not self.uses_bn:
            yield None
            return
        with bn_statistics(self.model, per_sample=self.per_sample, batch=True) as stats:
            yield stats
