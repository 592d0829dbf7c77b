"""Direct image optimisation (ZeroQ / DSG-PTQ style, ALGORITHMS.md §2): learn the pixels themselves.

Each batch x (in P's normalized input space, initialised N(0, I)) minimises, with Adam and a cosine
learning-rate decay,

    L(x) = w_bn·L_BNS(P, roll(x)) + w_ce·CE(P(roll(x)), y) + w_tv·TV(x) + w_l2·mean(x²)

where y is a random label, roll(x) a random circular shift of up to ``jitter`` pixels (a new one each
step), L_BNS the BN-statistics loss of :mod:`dfq_search.synth.bn` (with ``bn_relative`` its
scale-free form: each layer's misfit in units of its own running variance), and
TV(x) = mean |x[..., i+1, j] − x[..., i, j]| + mean |x[..., i, j+1] − x[..., i, j]|. After each step
the pixels are clamped to the range real images can take (the normalized [0, 1] box) when ``clamp``.
P stays in eval mode and its parameters get no gradient (only the pixels are asked for).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfq_search.errors import DfqError
from dfq_search.models.base import Preprocess
from dfq_search.synth.bn import bn_loss, bn_statistics, require_bn

FROM_MODEL = ("mean", "std")  # the pixel box: the model's preprocessing, never a user setting


@dataclass(frozen=True)
class DirectConfig:
    """Weights and schedule of direct image optimisation; every weight must be >= 0."""

    iterations: int = 100
    lr: float = 0.5
    batch_size: int = 128
    bn_weight: float = 1.0
    ce_weight: float = 0.1
    tv_weight: float = 0.01
    l2_weight: float = 0.01
    jitter: int = 2
    use_std: bool = False
    bn_relative: bool = True
    # floor of the scale-free loss's per-channel unit, x the layer's mean running variance (near-dead
    # channels): 0.1 measured +1.6 on ResNet-20 W2A4, +1.25 on ResNet-32 W3A3 but -2.1 on ResNet-32
    # W2A4 (README "The model panel, and synthesis that transfers"), so it is an option, off by default
    bn_floor: float = 0.0
    clamp: bool = True
    mean: tuple[float, ...] | None = None  # P's input normalization, for the clamp box; None = no box
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("bn_weight", "ce_weight", "tv_weight", "l2_weight", "lr", "bn_floor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise DfqError(f"direct synthesis {name}", value, "a finite number >= 0", f"set {name} >= 0")
        for name in ("iterations", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DfqError(f"direct synthesis {name}", value, "an int >= 1", f"pass a positive {name}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int) or self.jitter < 0:
            raise DfqError("direct synthesis jitter", self.jitter, "an int >= 0", "pass e.g. 2")
        for name in ("use_std", "bn_relative", "clamp"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise DfqError(f"direct synthesis {name}", value, "true or false", f"set {name}: true")
        if self.bn_floor > 0 and not self.bn_relative:
            raise DfqError("direct synthesis bn_floor", self.bn_floor,
                           "0 unless bn_relative is true (it floors the scale-free loss's unit)",
                           "set bn_relative: true, or bn_floor: 0")  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "direct synthesis") -> DirectConfig:
        """A config from user settings (a space file's ``samples.direct``, ``--synth-set``): every key a
        field, except the pixel box (``mean``/``std``), which comes from the model's preprocessing."""
        settable = [f.name for f in fields(cls) if f.name not in FROM_MODEL]
        for key in data:
            if key not in settable:
                why = "set from the model's preprocessing" if key in FROM_MODEL else "not a setting"
                raise DfqError(f"{where}.{key}", data[key], f"one of {', '.join(settable)} ({key}: {why})",
                               f"drop {key}")  # fmt: skip
        return cls(**data)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic TV: mean absolute difference of vertical and of horizontal neighbours."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _box(cfg: DirectConfig, channels: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
    if not cfg.clamp or cfg.mean is None or cfg.std is None:
        return None
    mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, -1, 1, 1)
    if mean.shape[1] != channels or std.shape[1] != channels:
        raise DfqError(
            "the pixel box's mean/std do not match the input channels", (cfg.mean, cfg.std),
            f"one mean and one std per input channel ({channels})", "pass the model's preprocess",
        )  # fmt: skip
    return -mean / std, (1 - mean) / std


def _roll(x: Tensor, jitter: int, gen: torch.Generator) -> Tensor:
    if jitter == 0:
        return x
    dx, dy = (torch.randint(-jitter, jitter + 1, (2,), generator=gen)).tolist()
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def optimize_batch(
    model: nn.Module, x0: Tensor, y: Tensor, cfg: DirectConfig, gen: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """Optimise the pixels of one batch ``x0`` towards labels ``y``; returns (x, last loss terms)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations, eta_min=cfg.lr * 0.01)
    box = _box(cfg, x.shape[1], x.device)
    terms: dict[str, Tensor] = {}
    with bn_statistics(model) as stats:
        for _ in range(cfg.iterations):
            logits = model(_roll(x, cfg.jitter, gen))
            terms = {
                "bn": bn_loss(stats, cfg.use_std, relative=cfg.bn_relative, floor=cfg.bn_floor),
                "ce": F.cross_entropy(logits, y),
                "tv": total_variation(x),
                "l2": x.pow(2).mean(),
            }
            loss = (cfg.bn_weight * terms["bn"] + cfg.ce_weight * terms["ce"]
                    + cfg.tv_weight * terms["tv"] + cfg.l2_weight * terms["l2"])  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[x])  # pixels only: no weight gradients of P are computed
            opt.step()
            sched.step()
            if box is not None:
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, box[1]), box[0]))
    return x.detach(), {k: float(v.detach()) for k, v in terms.items()}


def synthesize_images(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    num_classes: int,
    n_images: int,
    *,
    batch_size: int | None = None,
    iterations: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    config: DirectConfig | None = None,
    history: list[dict[str, float]] | None = None,
    preprocess: Preprocess | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """``n_images`` synthetic inputs of P and their labels, by direct optimisation (module docstring).

    Returns (images float [n, C, H, W] in P's normalized input space, labels int64 [n]), both on CPU.
    ``batch_size``, ``iterations`` and ``lr`` override ``config``'s. Images are optimised batch by
    batch (the BN statistics are those of a batch); labels are uniform random, seeded by ``seed``.
    ``history``, when given, receives the final loss terms of every batch. ``preprocess`` (P's) sets
    the clamp box of the pixels to what real images can reach. P is left unchanged (parameters,
    buffers, train/eval flag). ``progress(done, n_images)`` is called after every batch.

    Defaults: 100 Adam steps at lr 0.5, batch 128, the scale-free BN loss (``bn_relative``: each
    layer's misfit in units of its own running variance, per channel; ``bn_floor`` floors that unit
    at a fraction of the layer's mean, for near-dead channels). The absolute loss at lr 0.25 (the first
    defaults, chosen on ResNet-20) left nets whose BN inputs have small variances far from their
    statistics (mnist_dwnet: relative misfit 0.23 against 0.004 for real images; data-free BRECQ at
    W2A4 83.3% against 95.3% on real images) and made a VGG-style net's W4A4 BRECQ fall below its
    round-to-nearest start; scale-free at lr 0.5 serves both and ResNet-20 within 0.2 point (README
    "The model panel, and synthesis that transfers"). ``bn_relative=False, lr=0.25`` restores the first.
    1,024 images took 282 s on ONE torch thread of a 2-core machine shared by three jobs; two
    threads on busy cores were ~10x slower (OpenMP waits), so call ``torch.set_num_threads(1)``.
    """
    cfg = config or DirectConfig()
    given: tuple[tuple[str, object], ...] = (
        ("batch_size", batch_size), ("iterations", iterations), ("lr", lr),
    )  # fmt: skip
    if preprocess is not None:
        given += (("mean", preprocess.mean), ("std", preprocess.std))
    overrides = {k: v for k, v in given if v is not None}
    if overrides:
        cfg = DirectConfig(**{**cfg.__dict__, **overrides})
    was_training = model.training
    images, labels = [], []
    try:
        _check_inputs(model, input_shape, num_classes, n_images, device)
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, n_images, cfg.batch_size):
            b = min(cfg.batch_size, n_images - start)
            y = torch.randint(num_classes, (b,), generator=gen)
            x0 = torch.randn(b, *input_shape, generator=gen)
            x, terms = optimize_batch(model, x0.to(device), y.to(device), cfg, gen)
            images.append(x.cpu())
            labels.append(y)
            if history is not None:
                history.append(terms)
            if progress is not None:
                progress(start + b, n_images)
    finally:
        model.train(was_training)
    return torch.cat(images), torch.cat(labels)


def _check_inputs(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int, n_images: int, device
) -> None:
    """Bad input is refused before any optimisation starts."""
    require_bn(model, "direct image synthesis")
    if len(tuple(input_shape)) != 3 or any(int(s) < 1 for s in input_shape):
        raise DfqError("input_shape", input_shape, "(C, H, W) with positive sizes", "pass e.g. (3, 32, 32)")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise DfqError("n_images", n_images, "an int >= 1", "pass e.g. 1024")
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, *input_shape, device=device))
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise DfqError(
            "num_classes disagrees with the model's output", num_classes,
            f"the model's output has shape {tuple(out.shape)}", f"pass num_classes={out.shape[-1]}",
        )  # fmt: skip
