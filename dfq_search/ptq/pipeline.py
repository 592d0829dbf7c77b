"""One post-training quantization run: calibrate, then reconstruct (BRECQ / QDrop / ModCap).

    result = run_ptq(P, plan, batches, PTQConfig(modcap_k=1), device="cpu")
    result.model          # Q, a plain quantized model (hard-rounded weights, learned step sizes)
    result.unit_errors    # relative output error of every unit after reconstruction
    result.oscillation    # the oscillation figure of those errors

P is never modified. ``batches`` is any iterable of input tensors (or (input, label) pairs): real
images, buffered synthetic ones, or Gaussian noise; it is read into memory once.

With ``heldout`` images (synthetic images the reconstruction never sees) the guard of
:mod:`dfq_search.ptq.guard` compares the reconstructed model with the round-to-nearest one it started
from, by their logits' MSE to P on those images, and keeps the reconstruction unless it is less
faithful (``result.guard`` says what was measured and kept).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dfq_search.errors import DfqError
from dfq_search.layout import fast_input
from dfq_search.ptq.calibrate import as_batches, calibrate_ranges_, reestimate_bn_
from dfq_search.ptq.config import PTQConfig, ReconConfig
from dfq_search.ptq.guard import guard, heldout_images
from dfq_search.ptq.modcap import check_k, data_capacity, data_free_capacity, modcap_chains, named_chains
from dfq_search.ptq.reconstruct import Chain, ChainRecord, reconstruct_chain_
from dfq_search.ptq.reuse import UnitStore, group_keys, run_context
from dfq_search.ptq.units import Unit, capture, find_units, unit_errors
from dfq_search.quant import PROTOCOLS, BitPlan, QuantConfig, quantized_copy

Progress = Callable[[int, int, nn.Module], None]
log = logging.getLogger(__name__)


def oscillation(errors: Sequence[float]) -> float:
    """Σ_i |e_{i+1} − e_i| − |e_last − e_first|: the up-and-down of the per-unit errors beyond their
    net trend (0 for a monotone sequence; twice the sum of the moves against the trend otherwise)."""
    steps = [b - a for a, b in itertools.pairwise(errors)]
    return sum(abs(s) for s in steps) - abs(sum(steps))


def rise(errors: Sequence[float]) -> float:
    """Σ_i max(e_{i+1} − e_i, 0): the sum of the increases of the error along the units."""
    return sum(max(b - a, 0.0) for a, b in itertools.pairwise(errors))


@dataclass
class PTQResult:
    """The quantized model and what its reconstruction did.

    ``unit_errors`` are those of ``model``; ``guard`` is None unless the guard ran (then ``{"metric":
    "mse", "rtn": …, "reconstructed": …, "kept": "reconstructed" | "rtn", "images": N}``, the logits'
    MSEs to P on the held-out images).
    """

    model: nn.Module
    units: list[Unit]
    groups: list[list[str]]
    records: list[ChainRecord] = field(default_factory=list)
    unit_errors: list[float] = field(default_factory=list)
    differentials: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    guard: dict | None = None

    @property
    def oscillation(self) -> float:
        return oscillation(self.unit_errors)

    @property
    def rise(self) -> float:
        return rise(self.unit_errors)

    def summary(self) -> dict:
        return {
            "groups": self.groups, "unit_errors": self.unit_errors, "oscillation": self.oscillation,
            "rise": self.rise, "differentials": self.differentials, "seconds": self.seconds,
            "chain_losses": [(r.units, r.loss_before, r.loss_after) for r in self.records],
            "guard": self.guard,
        }  # fmt: skip


def _unit_module(q: nn.Module, unit: Unit) -> nn.Module:
    """The unit as one module of ``q``: its module, or its modules chained (sharing q's)."""
    modules = [q.get_submodule(m) for m in unit.modules]
    return modules[0] if len(modules) == 1 else Chain(modules)


def reconstruct_(
    q: nn.Module, p: nn.Module, data: Sequence[Tensor], units: Sequence[Unit],
    groups: Sequence[Sequence[int]], config: ReconConfig, progress: Progress | None = None,
    reuse: tuple[UnitStore, Sequence[str]] | None = None,
) -> list[ChainRecord]:  # fmt: skip
    """Reconstruct ``q``'s units group by group (each group a chain of unit indices), in order;
    ``progress(done, total, q)`` is called after each group.

    A group's input and target are captured by running Q and P up to it, unless the group before feeds
    it directly (``Unit.feeds_next``): then they are that group's stored input and target run through
    its reconstructed Q modules and this group's P modules (one unit's compute, not the model's prefix:
    the captures were a sixth of a ResNet-20 trial). ``reuse``: a store and every group's key
    (:func:`~dfq_search.ptq.reuse.group_keys`); a group found there is loaded, not reconstructed, and
    one reconstructed is kept there.
    """
    records, carried = [], None
    for done, group in enumerate(groups, 1):
        chain = [units[i] for i in group]
        named = {m: q.get_submodule(m) for u in chain for m in u.modules}
        if reuse is not None and (record := reuse[0].load(reuse[1][done - 1], named)) is not None:
            records.append(record)
            carried = None
        else:
            if carried is None:
                x = capture(q, chain[0], data, "input")
                y = capture(p, chain[-1], data, "output")
            else:
                x, y = carried[0], _run([_unit_module(p, u) for u in chain], carried[1])
            modules = [_unit_module(q, u) for u in chain]
            records.append(reconstruct_chain_(modules, [u.name for u in chain], x, y, config))
            if reuse is not None:
                reuse[0].save(reuse[1][done - 1], named, records[-1])
            feeds = done < len(groups) and chain[-1].feeds_next and groups[done][0] == group[-1] + 1
            carried = (_run(modules, x), y) if feeds else None
            del x, y
        if progress is not None:
            progress(done, len(groups), q)
    return records


@torch.no_grad()
def _run(modules: Sequence[nn.Module], x: Tensor, batch_size: int = 256) -> Tensor:
    """``modules`` applied one after another to ``x``, in eval mode, ``batch_size`` rows at a time."""
    chain = Chain(modules).eval()
    return torch.cat([chain(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _check_config(config: QuantConfig) -> None:
    if config.weight_range != "mse":
        raise DfqError(
            "reconstruction needs fixed weight ranges", config.weight_range, "weight_range='mse'",
            "use PROTOCOLS['ptq'].config or QuantConfig(weight_range='mse')",
        )  # fmt: skip


def run_ptq(
    p: nn.Module,
    plan: BitPlan,
    batches: Iterable,
    config: PTQConfig | None = None,
    quant_config: QuantConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    heldout: Tensor | Iterable | None = None,
    reuse: UnitStore | None = None,
) -> PTQResult:
    """Quantize a copy of ``p`` under ``plan`` and calibrate/reconstruct it on ``batches``.

    ``progress(done, total, q)``, when given, is called with done = 0 once the ranges are calibrated
    and after each reconstructed group of units (a search reports intermediate fidelities with it).
    ``heldout``: images (a tensor, or batches) kept apart from ``batches``; with ``config.guard`` and
    ``config.reconstruct`` the reconstructed model is checked against the round-to-nearest one on them
    and the more faithful one is returned (see the module docstring). ``reuse``: a store of earlier
    runs' reconstructed groups (:mod:`dfq_search.ptq.reuse`); groups whose plan, settings, data and
    predecessors match an entry are loaded from it instead of reconstructed.
    """
    config = config or PTQConfig()
    quant_config = quant_config or PROTOCOLS["ptq"].config
    _check_config(quant_config)
    start = time.perf_counter()
    data = as_batches(batches, device)
    held = heldout_images(heldout) if heldout is not None else None
    p.eval()
    data = [fast_input(p, x) for x in data]  # captures, calibration and reconstruction in P's layout
    units = find_units(p, data[0][:1])  # P's units are Q's: layers are swapped in place
    check_k(units, config.modcap_k)
    groups = named_chains(units, config.merges) if config.merges else [[i] for i in range(len(units))]
    q = quantized_copy(p, plan, data[0][:1], quant_config)
    if config.bn_reestimate:
        reestimate_bn_(q, data, device)
    calibrate_ranges_(q, data, config.act_range, config.percentile, device, config.recon.seed)
    result = PTQResult(q, units, [[u.name] for u in units])
    if config.reconstruct:
        if config.modcap_k > 0:
            caps = (data_capacity(unit_errors(q, p, units, data)) if config.capacity == "data"
                    else data_free_capacity(q, units, config.stride_factor))  # fmt: skip
            groups, diffs = modcap_chains(units, caps, config.modcap_k, config.max_chain)
            result.differentials = {f"{units[i].name}|{units[i + 1].name}": d for i, d in diffs.items()}
        result.groups = [[units[i].name for i in g] for g in groups]
        if progress is not None:
            progress(0, len(groups), q)
        rtn = copy.deepcopy(q) if config.guard and held is not None else None  # the RTN start
        keys = None
        if reuse is not None:
            context = run_context(p, data, config, quant_config, torch.device(device).type)
            keys = (reuse, group_keys(q, units, groups, context, data[0][:1]))
        result.records = reconstruct_(q, p, data, units, groups, config.recon, progress, keys)
        if rtn is not None:
            q = result.model = _guarded(result, p, rtn, q, held)
    result.unit_errors = unit_errors(q, p, units, data)
    result.seconds = time.perf_counter() - start
    return result


def _guarded(result: PTQResult, p: nn.Module, rtn: nn.Module, q: nn.Module, held: Tensor) -> nn.Module:
    """The model the guard keeps, with its record in ``result.guard``."""
    result.guard = g = guard(p, rtn, q, held)
    if g["kept"] == "rtn":
        log.warning(
            "reconstruction made Q less faithful to P on %d held-out images (logits' MSE %.4g, "
            "round-to-nearest %.4g): keeping the round-to-nearest model",
            g["images"], g["reconstructed"], g["rtn"],
        )  # fmt: skip
        return rtn
    log.info("guard: the reconstruction is kept (held-out logits' MSE %.4g, round-to-nearest %.4g)",
             g["reconstructed"], g["rtn"])  # fmt: skip
    return q
