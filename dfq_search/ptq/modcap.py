"""ModCap (MRECG): module capacities, their differentials, and the top-k joint reconstructions (§8).

Capacity of a unit M_i:

- data-dependent: ``−e_i``, with e_i = ‖Q(M_i)(x̃) − M_i(x)‖² / ‖M_i(x)‖² the relative error of its output
  on the calibration batches (Q round-to-nearest, running its own quantized prefix): a smaller
  error means a larger capacity;
- data-free: ``Σ_j α_j · params(W_j) · b_j`` over its layers (b_j = weight bits, α_j = ``stride_factor``
  for a strided layer, 1 otherwise), so it follows the bit plan.

Differential of an adjacent pair: d_i = ModCap(M_i) − ModCap(M_{i+1}), for pairs of units of the same
kind that feed each other directly (the candidates; units and their kinds: :mod:`dfq_search.ptq.units`).
The k pairs of largest |d_i| are reconstructed jointly; overlapping pairs chain (u_i, u_{i+1}, u_{i+2}),
up to ``max_chain`` units: a pair that would make a longer chain is passed over for the next one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from dfq_search.errors import DfqError
from dfq_search.ptq.units import Unit, unit_names_check
from dfq_search.quant.layers import QUANT_LAYERS


def candidate_pairs(units: Sequence[Unit]) -> list[int]:
    """Indices i of the adjacent, topologically alike pairs (u_i, u_{i+1})."""
    return [i for i in range(len(units) - 1) if units[i].feeds_next and units[i].kind == units[i + 1].kind]


def _why(units: Sequence[Unit]) -> str:
    """What the model's units offer ModCap, for an error message."""
    linked = [i for i in range(len(units) - 1) if units[i].feeds_next]
    if not linked:
        return (f"none of its {len(units)} units feeds the next (a function such as F.relu, a reshape "
                "or an addition runs between them)")  # fmt: skip
    pairs = [(units[i], units[i + 1]) for i in linked]
    shown = [f"{a.name} [{a.kind}] -> {b.name} [{b.kind}]" for a, b in pairs]
    return "linked neighbours: " + "; ".join(shown[:4]) + ("; ..." if len(shown) > 4 else "")


def check_k(units: Sequence[Unit], k: int) -> None:
    """Refuse a k larger than the number of candidate pairs (before any compute)."""
    n = len(candidate_pairs(units))
    if k > n:
        hint = (
            ", or build conv-BN-activation stacks from nn.Sequential, or from module calls (nn.ReLU, "
            "not F.relu) in a forward that torch.fx can trace, so that alike units feed each other"
        )
        raise DfqError(
            "ModCap k is larger than the number of adjacent, alike unit pairs", k,
            f"0 <= k <= {n} for this model ({_why(units)})", f"pass k <= {n}" + (hint if n == 0 else ""),
        )  # fmt: skip


def data_free_capacity(q: nn.Module, units: Sequence[Unit], stride_factor: float = 0.5) -> list[float]:
    """Σ_j α_j · params_j · bits_j of every unit of the quantized model ``q``."""
    caps = []
    for u in units:
        total = 0.0
        for name in u.layers:
            layer = q.get_submodule(name)
            if not isinstance(layer, QUANT_LAYERS):
                continue
            strided = max(getattr(layer, "stride", (1,))) > 1
            total += (stride_factor if strided else 1.0) * layer.weight.numel() * layer.w_bits
        caps.append(total)
    return caps


def data_capacity(errors: Sequence[float]) -> list[float]:
    """Capacity from relative reconstruction errors: −e_i."""
    return [-e for e in errors]


def differentials(caps: Sequence[float], units: Sequence[Unit]) -> dict[int, float]:
    """d_i = cap_i − cap_{i+1} for every candidate pair i."""
    return {i: caps[i] - caps[i + 1] for i in candidate_pairs(units)}


def select_pairs(diffs: dict[int, float], k: int, n_units: int, max_chain: int = 3) -> list[int]:
    """The k candidate pairs of largest |d_i| whose merged chains stay within ``max_chain`` units."""
    chosen: list[int] = []
    for i in sorted(diffs, key=lambda j: (-abs(diffs[j]), j)):
        if len(chosen) == k:
            break
        if max(len(c) for c in chains(n_units, [*chosen, i])) <= max_chain:
            chosen.append(i)
    if len(chosen) < k:
        raise DfqError(
            f"only {len(chosen)} pairs can be merged within chains of {max_chain} units", k,
            f"k <= {len(chosen)}", "lower k or raise max_chain",
        )  # fmt: skip
    return sorted(chosen)


def chains(n_units: int, pairs: Sequence[int]) -> list[list[int]]:
    """Partition units 0..n−1 into consecutive groups, joining u_i and u_{i+1} for every i in ``pairs``."""
    groups: list[list[int]] = [[0]] if n_units else []
    for i in range(1, n_units):
        if i - 1 in pairs:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def modcap_chains(
    units: Sequence[Unit], caps: Sequence[float], k: int, max_chain: int = 3
) -> tuple[list[list[int]], dict[int, float]]:
    """The groups to reconstruct (ModCap's top-k merges) and the differentials they came from."""
    check_k(units, k)
    diffs = differentials(caps, units)
    return chains(len(units), select_pairs(diffs, k, len(units), max_chain)), diffs


def named_chains(units: Sequence[Unit], merges: Sequence[Sequence[str]]) -> list[list[int]]:
    """The groups for hand-given chains of unit names; each must be consecutive, linked units."""
    index = {u.name: i for i, u in enumerate(units)}
    unit_names_check(units, [n for chain in merges for n in chain])
    pairs = []
    for chain in merges:
        idx = [index[n] for n in chain]
        linked = all(b == a + 1 and units[a].feeds_next for a, b in itertools.pairwise(idx))
        if not linked:
            raise DfqError(
                "a merge is not a chain of adjacent units that feed each other", list(chain),
                f"consecutive linked units among: {', '.join(u.name for u in units if u.feeds_next)}",
                "list adjacent units in forward order",
            )  # fmt: skip
        pairs += idx[:-1]
    return chains(len(units), pairs)
