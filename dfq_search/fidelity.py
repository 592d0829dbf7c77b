"""Label-free fidelity of a model Q to its float model P on the same images (no labels needed).

For logits z (Q's) and r (P's) over N images and C classes:

- ``agreement``: 100 · mean_n [argmax z_n = argmax r_n] (percent, higher is better);
- ``kl``: mean_n KL(softmax r_n ‖ softmax z_n) in nats (lower is better);
- ``mse``: mean_{n,c} (z_nc − r_nc)² (lower is better).

``score`` turns one of them into a value to maximise (agreement, or the negative KL / MSE). The search's
label-free objective (``dfq_search.search.objective.FidelityScorer``) and the post-training guard
(``dfq_search.ptq.guard``) both compute them here. Plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfq_search.layout import eval_mode, fast_input

METRICS = ("kl", "agreement", "mse")


@torch.inference_mode()
def logits(
    model: nn.Module, images: Tensor, batch_size: int = 256, device: torch.device | str | None = None
) -> Tensor:
    """``model``'s outputs on ``images``, float32 on CPU, in eval mode (every module's train flag is
    restored afterwards), ``batch_size`` images at a time on ``device`` (default: the model's)."""
    device = device if device is not None else next(model.parameters()).device
    with eval_mode(model):
        out = [
            model(fast_input(model, images[i : i + batch_size].to(device))).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(out)


def fidelity(z: Tensor, ref: Tensor) -> dict[str, float]:
    """Agreement (%), KL(P ‖ Q) and the logits' MSE of Q's logits ``z`` to P's ``ref`` (both [N, C])."""
    agree = 100.0 * (z.argmax(1) == ref.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(z, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
    return {"agreement": agree, "kl": float(kl), "mse": float(((z - ref) ** 2).mean())}


def score(metrics: dict[str, float], metric: str) -> float:
    """The value to maximise for ``metric`` (one of ``METRICS``): agreement, or −KL, or −MSE."""
    return metrics["agreement"] if metric == "agreement" else -metrics[metric]
