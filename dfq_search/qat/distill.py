"""Data-free end-to-end distillation of Q to P on a pool of synthetic images (after PTQ).

Block reconstruction (BRECQ/ModCap) matches each unit's output on its calibration images; this stage
then matches the whole network's logits, which the units never saw together. The pool may first be
low-pass filtered (``lowpass``, as SynQ does against the high frequencies of synthetic images). Each
step draws a batch from the pool and augments it: a random flip, a random shift by up to ``shift``
pixels with reflected borders, MixUp between images of the batch, and, for a share of the batch,
``adv_steps`` signed-gradient ascent steps on KL(P ‖ Q) within an L∞ ball of ``adv_eps`` per-channel
standard deviations of the pool (ZAQ's discrepancy maximisation, on the images rather than a
generator). It then minimises T²·KL(P(x) ‖ Q(x)) at ``temperature``: P labels every augmented image
itself, so the augmentations make new inputs without any label. Q's trainable parameters (all weights
and activation step sizes, or only the step sizes) move with Adam under a cosine schedule. P and Q
stay in eval mode (BatchNorm statistics are not updated).
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
from dfq_search.fidelity import fidelity, logits
from dfq_search.ptq.guard import METRIC
from dfq_search.ptq.units import find_units
from dfq_search.quant.quantize import set_observing_

TRAINABLE = ("all", "steps")


@dataclass
class DistillConfig:
    # defaults: the setting measured on ResNet-20 from the PTQ start (README, "end-to-end distillation")
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-4  # Adam, cosine to 0 over ``steps``
    weight_lr_scale: float = 1.0  # weights' lr = lr * weight_lr_scale (step sizes: lr)
    temperature: float = 4.0
    flip: bool = True
    shift: int = 2  # pixels; 0: no shift
    mixup: float = 0.0  # Beta(α, α) mixing of images within a batch; 0: none
    trainable: str = "all"  # all: weights and activation step sizes; steps: step sizes only
    feature_weight: float = 0.0  # + this × mean relative error of the units' outputs (Q vs P)
    lowpass: float = 0.0  # SynQ: Gaussian low-pass of the pool, cutoff σ as a fraction of the image size
    adv_steps: int = 0  # ascent steps on KL(P ‖ Q) per batch; 0: no adversarial images
    adv_eps: float = 0.1  # L∞ radius, in per-channel standard deviations of the pool
    adv_fraction: float = 0.5  # share of each batch made adversarial
    check_every: int = 100  # steps between held-out checks (with held-out images; 0: at the end only)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "shift", "adv_steps", "check_every"):
            v, least = getattr(self, name), 1 if name in ("steps", "batch_size") else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise DfqError(f"distill {name}", v, f"an int >= {least}", f"set {name} to one")
        bounds = {"lr": (0, math.inf), "weight_lr_scale": (0, math.inf), "temperature": (1e-6, math.inf),
                  "mixup": (0, math.inf), "adv_eps": (0, 10), "adv_fraction": (0, 1),
                  "lowpass": (0, 1), "feature_weight": (0, math.inf)}  # fmt: skip
        for name, (lo, hi) in bounds.items():
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not (lo <= v <= hi and math.isfinite(v))
            ):
                raise DfqError(f"distill {name}", v, f"a finite number in [{lo:g}, {hi:g}]", f"set {name}")
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


def lowpass(x: Tensor, cutoff: float) -> Tensor:
    """SynQ's low-pass filter: each image's spectrum times exp(−d² / 2σ²), d the distance from the zero
    frequency in cycles per pixel and σ = ``cutoff`` (0: no filter); the mean (d = 0) is kept."""
    if cutoff <= 0:
        return x
    h, w = x.shape[-2:]
    fy, fx = torch.fft.fftfreq(h, device=x.device), torch.fft.fftfreq(w, device=x.device)
    d2 = fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2
    gain = torch.exp(-d2 / (2 * cutoff**2))
    return torch.fft.ifft2(torch.fft.fft2(x) * gain).real


def adversarial(p: nn.Module, q: nn.Module, x: Tensor, cfg: DistillConfig, radius: Tensor) -> Tensor:
    """The first ``adv_fraction`` of ``x`` moved by ``adv_steps`` signed-gradient ascent steps on
    KL(P ‖ Q), within ``radius`` (per channel) of where it started; the rest unchanged."""
    k = round(cfg.adv_fraction * len(x))
    if not cfg.adv_steps or k == 0:
        return x
    x0, step = x[:k], radius * (2.5 / cfg.adv_steps)  # PGD's usual step: 2.5 ε / steps
    xa = x0.clone()
    for _ in range(cfg.adv_steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(kl_to_p(p(xa), q(xa), cfg.temperature), xa)
        xa = torch.minimum(torch.maximum(xa.detach() + step * g.sign(), x0 - radius), x0 + radius)
    return torch.cat([xa, x[k:]])


class Features:
    """The outputs of the reconstruction units' last modules in P and in Q, kept by forward hooks while
    ``recording``, and their mean relative squared error ‖Q_u − P_u‖² / ‖P_u‖² (the units' own
    objective, here end to end: Q runs its own prefix)."""

    def __init__(self, p: nn.Module, q: nn.Module, example: Tensor) -> None:
        paths = [u.modules[-1] for u in find_units(p, example)]
        self.recording = False
        self.got: dict[str, list[Tensor]] = {"p": [], "q": []}
        self.handles = [m.get_submodule(path).register_forward_hook(self._keep(side))
                        for side, m in (("p", p), ("q", q)) for path in paths]  # fmt: skip

    def _keep(self, side: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if self.recording:
                self.got[side].append(out)

        return hook

    def loss(self) -> Tensor:
        pairs = zip(self.got["p"], self.got["q"], strict=True)
        errs = [(zq - zp).pow(2).sum() / zp.pow(2).sum().clamp_min(1e-12) for zp, zq in pairs]
        self.got = {"p": [], "q": []}
        return torch.stack(errs).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Best:
    """The state of Q most faithful to P on held-out images (the guard's metric, the logits' MSE to P;
    lower is better), among the states offered; ties keep the earlier one (the start first)."""

    def __init__(self, p: nn.Module, images: Tensor) -> None:
        self.images, self.ref = images, logits(p, images)
        self.step, self.score, self.state, self.start = -1, math.inf, None, math.inf

    def offer(self, step: int, q: nn.Module) -> None:
        score = fidelity(logits(q, self.images), self.ref)[METRIC]
        if step == 0:
            self.start = score
        if score < self.score:
            self.step, self.score = step, score
            self.state = {k: v.detach().clone() for k, v in q.state_dict().items()}


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
    monitor: Callable[[int, nn.Module], None] | None = None, every: int = 0, heldout: Tensor | None = None,
) -> dict[str, float]:  # fmt: skip
    """Distil ``q`` to ``p`` in place on ``images`` (already normalised, P's input); returns the mean
    loss of the first and last tenth of the steps and the seconds. ``monitor(step, q)`` is called every
    ``every`` steps (e.g. a label-free fidelity). With ``heldout`` images (synthetic, never in
    ``images``), Q is scored on them at the start, every ``check_every`` steps and at the end, and the
    most faithful of those states is the one Q ends in (the start included: distillation that only
    loses fidelity leaves Q as it was); the result then says which step was kept and both scores."""
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
    images = lowpass(images, cfg.lowpass)
    radius = cfg.adv_eps * images.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    feats = Features(p, q, images[:1]) if cfg.feature_weight > 0 else None
    best = Best(p, heldout) if heldout is not None else None
    if best is not None:
        best.offer(0, q)
    losses, t0 = [], time.perf_counter()
    try:
        for step in range(cfg.steps):
            idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
            x = adversarial(p, q, augment(images[idx.to(images.device)], cfg, gen), cfg, radius)
            loss = _loss(p, q, x, cfg, feats)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if monitor is not None and every and (step + 1) % every == 0:
                monitor(step + 1, q)
            last = step + 1 == cfg.steps
            if best is not None and (last or (cfg.check_every and (step + 1) % cfg.check_every == 0)):
                best.offer(step + 1, q)
    finally:
        if feats is not None:
            feats.remove()
    tenth = max(1, len(losses) // 10)
    info = {"loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
            "seconds": time.perf_counter() - t0}  # fmt: skip
    if best is not None:
        q.load_state_dict(best.state)
        info |= {
            "kept_step": best.step,
            f"heldout_{METRIC}_start": best.start,
            f"heldout_{METRIC}": best.score,
        }
    return info


def _loss(p: nn.Module, q: nn.Module, x: Tensor, cfg: DistillConfig, feats: Features | None) -> Tensor:
    """KL(P ‖ Q) at the temperature on ``x``, plus the weighted feature error when ``feats``."""
    if feats is not None:
        feats.recording = True
    try:
        with torch.no_grad():
            z_p = p(x)
        loss = kl_to_p(z_p, q(x), cfg.temperature)
    finally:
        if feats is not None:
            feats.recording = False
    return loss if feats is None else loss + cfg.feature_weight * feats.loss()
