"""Data-free end-to-end distillation of Q to P on a pool of synthetic images (after PTQ).

Block reconstruction (BRECQ/ModCap) matches each unit's output on its calibration images; this stage
then matches the whole network's logits, which the units never saw together. Each step draws a batch
from the image pool, augments it (random flip, a random shift by up to ``shift`` pixels with reflected
borders, MixUp between images of the batch), and minimises KL(P(x) ‖ Q(x)) at ``temperature`` on it:
P labels every augmented image itself, so the augmentations make new inputs without any label. Q's
trainable parameters (all weights and activation step sizes, or only the step sizes) move with Adam
under a cosine schedule. P and Q stay in eval mode (BatchNorm statistics are not updated).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfq_search.errors import DfqError
from dfq_search.quant.quantize import set_observing_

TRAINABLE = ("all", "steps")


@dataclass
class DistillConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-5  # Adam, cosine to 0 over ``steps``
    weight_lr_scale: float = 1.0  # weights' lr = lr * weight_lr_scale (step sizes: lr)
    temperature: float = 1.0
    flip: bool = True
    shift: int = 2  # pixels; 0: no shift
    mixup: float = 0.0  # Beta(α, α) mixing of images within a batch; 0: none
    trainable: str = "all"  # all: weights and activation step sizes; steps: step sizes only
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DfqError(f"distill {name}", v, "an int >= 1", f"set {name} to a positive int")
        for name in ("lr", "weight_lr_scale", "temperature", "mixup"):
            v = getattr(self, name)
            bad = not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
            if bad or (name == "temperature" and v == 0):
                raise DfqError(f"distill {name}", v, "a finite number >= 0 (temperature > 0)", f"set {name}")
        if not isinstance(self.shift, int) or self.shift < 0:
            raise DfqError("distill shift", self.shift, "an int >= 0 (pixels)", "set shift")
        if self.trainable not in TRAINABLE:
            raise DfqError("distill trainable", self.trainable, f"one of {TRAINABLE}", "set trainable")


def augment(x: Tensor, cfg: DistillConfig, gen: torch.Generator) -> Tensor:
    """Flip, shift (reflected borders) and MixUp, each per image, from ``gen``."""
    n = len(x)
    if cfg.flip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    if cfg.shift:
        s, (h, w) = cfg.shift, x.shape[-2:]
        padded = F.pad(x, (s, s, s, s), mode="reflect")
        dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if cfg.mixup > 0:
        lam = torch.distributions.Beta(cfg.mixup, cfg.mixup).sample((n,)).to(x.device).view(-1, 1, 1, 1)
        perm = torch.randperm(n, generator=gen).to(x.device)
        x = lam * x + (1 - lam) * x[perm]
    return x


def kl_to_p(z_p: Tensor, z_q: Tensor, t: float) -> Tensor:
    """T² · KL(softmax(z_p/T) ‖ softmax(z_q/T)), batch mean."""
    log_p, log_q = F.log_softmax(z_p / t, 1), F.log_softmax(z_q / t, 1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * t * t


def _param_groups(q: nn.Module, cfg: DistillConfig) -> list[dict]:
    steps, weights = [], []
    for name, p in q.named_parameters():
        if not p.requires_grad:
            continue
        (steps if name.endswith("scale") else weights).append(p)
    groups = [{"params": steps, "lr": cfg.lr}]
    if cfg.trainable == "all" and cfg.weight_lr_scale > 0:
        groups.append({"params": weights, "lr": cfg.lr * cfg.weight_lr_scale})
    return [g for g in groups if g["params"]]


def distill(
    p: nn.Module, q: nn.Module, images: Tensor, cfg: DistillConfig,
    monitor: Callable[[int, nn.Module], None] | None = None, every: int = 0,
) -> dict[str, float]:  # fmt: skip
    """Distil ``q`` to ``p`` in place on ``images`` (already normalised, P's input); returns the mean
    loss of the first and last tenth of the steps and the seconds. ``monitor(step, q)`` is called every
    ``every`` steps (e.g. a label-free fidelity)."""
    p.eval(), q.eval()
    set_observing_(q, False)
    groups = _param_groups(q, cfg)
    if not groups:
        raise DfqError("distill: Q has no trainable parameters", cfg.trainable, "weights or step sizes",
                       "pass a quantized model whose ranges are frozen")  # fmt: skip
    params = [t for g in groups for t in g["params"]]
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # MixUp's Beta draws
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x = augment(images[idx.to(images.device)], cfg, gen)
        with torch.no_grad():
            z_p = p(x)
        loss = kl_to_p(z_p, q(x), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if monitor is not None and every and (step + 1) % every == 0:
            monitor(step + 1, q)
    tenth = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
            "seconds": time.perf_counter() - t0}  # fmt: skip
