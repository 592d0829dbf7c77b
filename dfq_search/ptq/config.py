"""Typed settings of post-training reconstruction; unknown keys are refused with a suggestion."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from dfq_search.errors import DfqError, refuse_unknown_keys

ACT_RANGES = ("minmax", "percentile", "mse")
CAPACITIES = ("data", "free")


def _refuse_unknown(cls: type, data: Mapping[str, Any]) -> None:
    refuse_unknown_keys(cls.__name__, data, [f.name for f in fields(cls)])


def _positive(name: str, value: Any, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, (kind, int)) or value <= 0:
        raise DfqError(name, value, f"a positive {kind.__name__}", f"pass a positive {name}")


@dataclass(frozen=True)
class ReconConfig:
    """Block reconstruction (AdaRound + BRECQ + QDrop), ALGORITHMS.md §7.

    iters: optimiser steps per unit (the papers' 20k is for GPUs). ResNet-20 W4A4 on 1,024 real
        images, 2 CPU cores: 100 steps 79.65 (15 s), 300 steps 80.41 (29 s), 1000 steps 80.29.
    batch_size: images per step, drawn at random from the stored calibration activations.
    lam: weight λ of the rounding regulariser ``Σ 1 − |2h(V) − 1|^b``.
    b_start, b_end, warmup: b anneals from b_start to b_end after the first ``warmup`` fraction
        of the steps (no regulariser during the warm-up).
    lr: Adam learning rate of the rounding variables V.
    act_lr: Adam learning rate of the activation step sizes (0 keeps them fixed).
    qdrop: probability of keeping the float value at each activation quantizer during the
        reconstruction of a unit (QDrop; 0 = BRECQ).
    seed: draws of the mini-batches and of the QDrop masks.
    """

    iters: int = 300
    batch_size: int = 32
    lam: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    lr: float = 3e-3
    act_lr: float = 4e-4
    qdrop: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("iters", self.iters)
        _positive("batch_size", self.batch_size)
        for name in ("lam", "act_lr"):
            if getattr(self, name) < 0:
                raise DfqError(name, getattr(self, name), ">= 0", f"pass a non-negative {name}")
        _positive("lr", self.lr, float)
        if not 0.0 <= self.warmup < 1.0:
            raise DfqError("warmup", self.warmup, "a fraction in [0, 1)", "e.g. 0.2")
        if not 0.0 <= self.qdrop < 1.0:
            raise DfqError("qdrop", self.qdrop, "a probability in [0, 1)", "0.5 for QDrop, 0 for BRECQ")
        if not self.b_start >= self.b_end > 0:
            raise DfqError("b_start, b_end", (self.b_start, self.b_end), "b_start >= b_end > 0", "e.g. 20, 2")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReconConfig:
        _refuse_unknown(cls, data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PTQConfig:
    """One post-training quantization run (what :func:`dfq_search.ptq.run_ptq` does).

    act_range: how activation ranges are calibrated ("minmax", "percentile", "mse").
    percentile: the upper percentile for ``act_range="percentile"`` (the lower one is 100 − it).
    bn_reestimate: re-estimate Q's BatchNorm statistics on the calibration batches first (§11).
    reconstruct: run block reconstruction (False gives round-to-nearest with calibrated ranges).
    modcap_k: how many adjacent-unit pairs ModCap reconstructs jointly (0 = plain BRECQ).
    capacity: "data" (RTN reconstruction error) or "free" (bit- and stride-weighted parameters).
    stride_factor: α of a strided layer in the data-free capacity (1 for stride 1).
    max_chain: the longest chain of units merged into one (pairs may chain).
    merges: chains of unit names to reconstruct jointly, given by hand (instead of ModCap's choice;
        e.g. the public MRECG code's fixed merges); each chain must be adjacent, linked units.
    guard: when ``run_ptq`` is given held-out images, keep the round-to-nearest model instead of the
        reconstructed one if reconstruction made Q's logits less faithful to P's on them (higher MSE;
        ties keep the reconstruction; :mod:`dfq_search.ptq.guard`). False always keeps the
        reconstruction. Without held-out images, or with ``reconstruct=False``, it does nothing.
    """

    act_range: str = "percentile"
    percentile: float = 99.99
    bn_reestimate: bool = False
    reconstruct: bool = True
    modcap_k: int = 0
    capacity: str = "data"
    stride_factor: float = 0.5
    max_chain: int = 3
    merges: tuple[tuple[str, ...], ...] = ()
    guard: bool = True
    recon: ReconConfig = ReconConfig()

    def __post_init__(self) -> None:
        if self.act_range not in ACT_RANGES:
            raise DfqError("act_range", self.act_range, f"one of {ACT_RANGES}", "pick one")
        if self.capacity not in CAPACITIES:
            raise DfqError("capacity", self.capacity, f"one of {CAPACITIES}", "pick one")
        if not 50.0 < self.percentile <= 100.0:
            raise DfqError("percentile", self.percentile, "in (50, 100]", "e.g. 99.99")
        if isinstance(self.modcap_k, bool) or not isinstance(self.modcap_k, int) or self.modcap_k < 0:
            raise DfqError("modcap_k", self.modcap_k, "an int >= 0", "0 for plain BRECQ, e.g. 1, 2 or 3")
        if self.max_chain < 2:
            raise DfqError("max_chain", self.max_chain, "an int >= 2", "e.g. 3")
        _positive("stride_factor", self.stride_factor, float)
        if not isinstance(self.guard, bool):
            raise DfqError("guard", self.guard, "True or False", "true keeps RTN when it is more faithful")
        object.__setattr__(self, "merges", tuple(tuple(c) for c in self.merges))
        if self.merges and self.modcap_k:
            raise DfqError("merges and modcap_k", (self.merges, self.modcap_k), "one of them", "drop one")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PTQConfig:
        _refuse_unknown(cls, data)
        data = dict(data)
        if isinstance(data.get("recon"), Mapping):
            data["recon"] = ReconConfig.from_dict(data["recon"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ignored(self, path: str) -> str | None:
        """Why this config would ignore the setting at ``path`` (None: it reads it): e.g. ``percentile``
        unless ``act_range`` is percentile, the reconstruction's settings without reconstruction."""
        top = path.split(".")[0]
        if top == "percentile" and self.act_range != "percentile":
            return f"percentile is read with act_range percentile only (act_range is {self.act_range})"
        reconstruction = ("recon", "modcap_k", "capacity", "stride_factor", "max_chain", "merges", "guard")
        if top in reconstruction and not self.reconstruct:
            return f"{top} is read by the reconstruction only, and reconstruct is false"
        if top in ("capacity", "stride_factor", "max_chain") and not self.modcap_k:
            return f"{top} is read by ModCap only, and modcap_k is 0"
        if top == "stride_factor" and self.capacity != "free":
            return f"stride_factor is read by the data-free capacity only (capacity is {self.capacity})"
        return None
