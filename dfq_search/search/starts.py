"""Where a campaign starts: ZeroQ's per-layer sensitivity of the weights and, where activation bits
are searched, of the activations (measured once, kept in the campaign folder),
and the plans enqueued before the search proposes any: the uniform plans that fit the budget, the
sensitivity-DP plan (ZeroQ's exact allocation, §9) and HAWQ-V3's plan (Hessian-trace sensitivity on
the synthetic images, an integer linear program under every limit of the budget at once)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dfq_search.errors import DfqError
from dfq_search.quant import LayerBits
from dfq_search.quant.cost import FLOAT_BITS
from dfq_search.search.define import PlanSpace

Log = Callable[[str], None]
SENSITIVITY_IMAGES = 128
HESSIAN_IMAGES, HESSIAN_BATCH, HESSIAN_PROBES = 128, 32, 8


def _by_bits(saved: dict) -> dict[str, dict[int, float]]:
    """A per-layer, per-bits table as JSON keeps it (bits as strings), with int bits again."""
    return {k: {int(b): v for b, v in d.items()} for k, d in saved.items()}


def sensitivity(bundle, calib, plans_space, layers, run_dir: Path, device, log: Log) -> dict | None:
    """ZeroQ's Ω per layer and weight choice, measured once and kept in the campaign folder
    (``sensitivity.json``); None when no layer's weights are searched (nothing to order or allocate)."""
    probe = PlanSpace(plans_space, layers)
    if all(len(c.w) == 1 for c in probe.choices):
        return None
    path = run_dir / "sensitivity.json"
    if path.is_file():
        return _by_bits(json.loads(path.read_text()))
    from dfq_search.ptq.sensitivity import zeroq_sensitivity

    bits = sorted({w for c in probe.choices for w in c.w})
    start = time.perf_counter()
    sens = zeroq_sensitivity(bundle.model, list(calib[:SENSITIVITY_IMAGES].split(64)), bits, device)
    log(f"sensitivity of {len(sens)} layers at bits {bits}: {time.perf_counter() - start:.1f} s")
    path.write_text(json.dumps(sens))
    return sens


def act_sensitivity(bundle, calib, plans_space, layers, run_dir: Path, device, log: Log) -> dict | None:
    """Ω^a per layer and activation choice (:func:`dfq_search.ptq.sensitivity.act_sensitivity`), for a
    space where some layer has several: measured once, kept in the campaign folder
    (``act_sensitivity.json``); None when no layer's activations are searched."""
    probe = PlanSpace(plans_space, layers)
    if all(len(c.a) == 1 for c in probe.choices):
        return None
    path = run_dir / "act_sensitivity.json"
    if path.is_file():
        return _by_bits(json.loads(path.read_text()))
    from dfq_search.ptq.sensitivity import act_sensitivity as measure

    bits = sorted({a for c in probe.choices for a in c.a})
    skip = [i.name for i in layers if i.reads_model_input]
    start = time.perf_counter()
    sens = measure(bundle.model, list(calib[:SENSITIVITY_IMAGES].split(64)), bits, device, skip)
    log(f"activation sensitivity of {len(sens)} layers at bits {bits}: {time.perf_counter() - start:.1f} s")
    path.write_text(json.dumps(sens))
    return sens


def hessian_sensitivity(bundle, calib, plans: PlanSpace, run_dir: Path, device, log: Log) -> dict:
    """HAWQ-V3's Ω per layer and weight choice (:mod:`dfq_search.ptq.hessian`), measured once on the
    calibration samples and kept in the campaign folder (``hessian.json``: the traces and Ω)."""
    path = run_dir / "hessian.json"
    if path.is_file():
        return _by_bits(json.loads(path.read_text())["omega"])
    from dfq_search.ptq.hessian import hawq_sensitivity, hessian_traces

    bits = sorted({w for c in plans.choices for w in c.w})
    start = time.perf_counter()
    batches = list(calib[:HESSIAN_IMAGES].split(HESSIAN_BATCH))
    traces = hessian_traces(bundle.model, batches, HESSIAN_PROBES, device=device)
    omega = hawq_sensitivity(bundle.model, traces, bits)
    n = min(len(calib), HESSIAN_IMAGES)
    log(f"Hessian traces of {len(traces)} layers ({HESSIAN_PROBES} probes on {n} samples): "
        f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    path.write_text(json.dumps({"traces": traces, "omega": omega}))
    return omega


def warm_starts(
    plans: PlanSpace, kinds: tuple[str, ...] = ("uniform", "sensitivity"), hessian: Mapping | None = None
) -> dict[str, dict[str, LayerBits]]:
    """Named plans the campaign runs first, of ``kinds``: uniform ones that fit the budget
    ("uniform"), the sensitivity DP ("sensitivity") and HAWQ-V3's ILP on ``hessian``'s Ω
    ("hessian")."""
    out = {}
    for bits in plans.uniform_bits() if "uniform" in kinds else []:
        ws = sorted({b.w for b in bits.values()})
        out[f"uniform-w{'/'.join(map(str, ws))}"] = bits
    dp = dp_plan(plans) if "sensitivity" in kinds else None
    if dp is not None:
        out["sensitivity-dp"] = dp
    ilp = ilp_plan(plans, hessian, plans.act_sensitivity) if "hessian" in kinds and hessian else None
    if ilp is not None:
        out["hessian-ilp"] = ilp
    return out


def ilp_plan(
    plans: PlanSpace, omega: Mapping[str, Mapping[int, float]], act_omega: Mapping | None = None
) -> dict[str, LayerBits] | None:
    """HAWQ-V3's allocation: the bits minimising Σ Ω_i(k_i) + Ω^a_i(a_i) under every limit of the
    budget at once (size, mean bits and BOPs), by an integer linear program over each layer's (weight,
    activation) pairs. Without ``act_omega`` (Ω^a, :func:`act_sensitivity`), HAWQ-V3's own program:
    weights only, each layer's activations at its highest choice, then repaired (lower activations)
    where a BOPs limit still needs it. Each choice's use of a limit is what the campaign's cost model
    adds for it, so the two always agree. None when no assignment fits."""
    from dfq_search.ptq.ilp import allocate_ilp

    known = act_omega or {}  # a layer without Ω^a (one reading the float image) keeps its highest a
    acts = {c.name: c.a if c.name in known else c.a[-1:] for c in plans.choices}
    pairs = {c.name: [LayerBits(w, a) for w in c.w for a in acts[c.name]] for c in plans.choices}
    base = {n: min(ps, key=lambda b: (b.w, b.a)) for n, ps in pairs.items()}
    keys = [key for key, _ in plans.limits.values()]
    floor = plans.cost(base)
    use, cost = {}, {}
    for name, ps in pairs.items():
        om, om_a = omega.get(name, {}), (act_omega or {}).get(name, {})
        use[name] = {b: [plans.cost({**base, name: b})[k] - floor[k] for k in keys] for b in ps}
        cost[name] = {b: float(om.get(b.w, 0.0)) + float(om_a.get(b.a, 0.0)) for b in ps}
    limits = [limit - floor[key] + 1e-9 for key, limit in plans.limits.values()]
    try:
        chosen = allocate_ilp(cost, use, limits)
    except DfqError:
        chosen = base  # over a BOPs limit even so: the repair's turn
    bits = plans.repair(dict(chosen))
    return bits if plans.excess(plans.cost(bits)) <= 1e-9 else None


def dp_plan(plans: PlanSpace) -> dict[str, LayerBits] | None:
    """ZeroQ's exact DP over the weight choices under the budget's tightest size limit (activations at
    their highest), then repaired to fit its other limits (a BOPs limit); None without a size limit."""
    from dfq_search.ptq.sensitivity import allocate_bits

    params = {i.name: i.params for i in plans.layers}
    total = sum(params[c.name] for c in plans.choices)
    float_bits = FLOAT_BITS * (sum(params.values()) - total)  # layers left in float count in the size
    size_bits = {"size_kib": lambda v: v * 8192 - float_bits, "mean_weight_bits": lambda v: v * total}
    limits = [size_bits[key](v) for key, v in plans.limits.values() if key in size_bits]
    if not plans.sensitivity or not limits:
        return None
    sens = {c.name: {w: plans.sensitivity.get(c.name, {}).get(w, 0.0) for w in c.w} for c in plans.choices}
    try:
        chosen = allocate_bits(sens, params, min(limits) + 1e-6)
    except DfqError:
        return None
    bits = plans.repair({c.name: LayerBits(chosen[c.name], c.a[-1]) for c in plans.choices})
    return bits if plans.excess(plans.cost(bits)) <= 1e-9 else None


def warm_start_points(plans: PlanSpace, starts: dict[str, dict[str, LayerBits]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for bits in starts.values():
        params = plans.params_of(bits)
        key = json.dumps(params, sort_keys=True)
        if params and key not in seen:
            seen.add(key)
            out.append(params)
    return out
