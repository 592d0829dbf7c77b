"""Where a campaign starts: ZeroQ's per-layer sensitivity (measured once, kept in the campaign folder),
and the plans enqueued before the search proposes any: the uniform plans that fit the budget and the
sensitivity-DP plan (ZeroQ's exact allocation, §9)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfq_search.errors import DfqError
from dfq_search.quant import LayerBits
from dfq_search.quant.cost import FLOAT_BITS
from dfq_search.search.define import PlanSpace

Log = Callable[[str], None]
SENSITIVITY_IMAGES = 128


def sensitivity(bundle, calib, plans_space, layers, run_dir: Path, device, log: Log) -> dict:
    path = run_dir / "sensitivity.json"
    if path.is_file():
        return {k: {int(b): v for b, v in d.items()} for k, d in json.loads(path.read_text()).items()}
    from dfq_search.ptq.sensitivity import zeroq_sensitivity

    probe = PlanSpace(plans_space, layers)
    bits = sorted({w for c in probe.choices for w in c.w})
    start = time.perf_counter()
    sens = zeroq_sensitivity(bundle.model, list(calib[:SENSITIVITY_IMAGES].split(64)), bits, device)
    log(f"sensitivity of {len(sens)} layers at bits {bits}: {time.perf_counter() - start:.1f} s")
    path.write_text(json.dumps(sens))
    return sens


def warm_starts(
    plans: PlanSpace, kinds: tuple[str, ...] = ("uniform", "sensitivity")
) -> dict[str, dict[str, LayerBits]]:
    """Named plans the campaign runs first, of ``kinds``: uniform ones that fit the budget
    ("uniform") and the sensitivity DP ("sensitivity")."""
    out = {}
    for bits in plans.uniform_bits() if "uniform" in kinds else []:
        ws = sorted({b.w for b in bits.values()})
        out[f"uniform-w{'/'.join(map(str, ws))}"] = bits
    dp = dp_plan(plans) if "sensitivity" in kinds else None
    if dp is not None:
        out["sensitivity-dp"] = dp
    return out


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
