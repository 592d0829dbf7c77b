"""HAWQ-V3's bit allocation: an integer linear program, solved by SciPy's ``milp`` (HiGHS).

One binary variable per layer and choice; each layer takes exactly one choice; the sum of the chosen
costs (a sensitivity Ω per choice) is minimised subject to any number of linear resource limits (weight
bits, BOPs, ...), which the DP of :func:`dfq_search.ptq.sensitivity.allocate_bits` cannot take together.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from dfq_search.errors import DfqError


def allocate_ilp(
    cost: Mapping[str, Mapping[Hashable, float]],
    use: Mapping[str, Mapping[Hashable, Sequence[float]]],
    limits: Sequence[float],
) -> dict[str, Hashable]:
    """The choice per layer minimising Σ cost[layer][choice] with, for every j, Σ use[layer][choice][j]
    ≤ limits[j]. ``use`` gives each choice of ``cost`` one value per limit. Raises DfqError when no
    assignment fits the limits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    index = [(name, choice) for name, options in cost.items() for choice in options]
    if not index:
        raise DfqError("bit allocation", {}, "at least one layer with a choice", "quantize some layer")
    c = np.array([cost[n][k] for n, k in index], dtype=float)
    rows = {name: i for i, name in enumerate(cost)}
    one = np.zeros((len(rows), len(index)))
    for j, (name, _) in enumerate(index):
        one[rows[name], j] = 1.0
    constraints = [LinearConstraint(one, 1.0, 1.0)]
    if limits:
        usage = np.array([[float(use[n][k][i]) for n, k in index] for i in range(len(limits))])
        scale = np.maximum(np.abs(usage).max(1), 1.0)  # rows of bits and BOPs in units the solver likes
        constraints.append(LinearConstraint(usage / scale[:, None], -np.inf, np.asarray(limits) / scale))
    result = milp(c, constraints=constraints, integrality=np.ones(len(index)), bounds=Bounds(0, 1))
    if result.x is None:
        raise DfqError("bit allocation", list(limits), "limits some assignment of the choices meets",
                       f"raise the limits or allow fewer bits ({result.message})")  # fmt: skip
    chosen = {}
    for j, (name, choice) in enumerate(index):
        if result.x[j] > 0.5:
            chosen[name] = choice
    return chosen
