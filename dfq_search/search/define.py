"""A search space made concrete for one model: per-layer bit choices, the budget, and the Optuna
define-by-run function that Ray Tune's ``OptunaSearch`` calls (importable, picklable: resume needs it).

Parameters of a trial: ``w:<layer>`` and ``a:<layer>`` for layers with more than one choice, and the
method knobs, ``<part>.<path in its config>`` (``kind``, ``ptq.modcap_k``, ``qat.sample_loss.lambda_l``,
...). The function also returns, as constants, the effective ``plan`` (after the budget repair), its
``cost`` and ``feasible``.

Budget repair: a sampled plan over the budget has the bits of one layer at a time lowered to its next
choice, the move with the least sensitivity increase per bit saved first (ZeroQ's Ω of the weights,
and Ω^a of the activations, when known; else the largest saving), until it fits; with several limits,
the first one exceeded picks what a move saves (weight bits, or BOPs for a BOPs limit, where lowering
a layer's activations is a move too). The plan is then a deterministic function of the sampled
parameters, which is what TPE models. With ``repair: false`` an over-budget plan is reported
infeasible without any compute, and its excess over each limit goes to Optuna as a constraint
(``Trial.set_constraint``) that steers the sampler away from such plans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dfq_search.errors import DfqError
from dfq_search.quant.cost import FLOAT_BITS, layer_costs
from dfq_search.quant.plan import DEFAULT_KEY, BitPlan, LayerBits, check_rule_keys, rule_chain
from dfq_search.quant.quantize import first_last_names
from dfq_search.quant.trace import LayerInfo
from dfq_search.search.space import SearchSpace

FIRST_LAST, DEFAULT = "_first_last", DEFAULT_KEY


@dataclass(frozen=True)
class LayerChoices:
    name: str
    w: tuple[int, ...]
    a: tuple[int, ...]


def _lookup(rules: Mapping[str, tuple[int, ...]], name: str, edge: bool) -> tuple[int, ...] | None:
    """The choices of the first rule covering ``name`` (a space's rule gives both ends of a layer's
    choices at once, where a plan's gives each field on its own): the plans' matcher, with
    ``_first_last`` as the group of the edge layers."""
    chain = rule_chain(rules, name, (FIRST_LAST,) if edge else ())
    return chain[0] if chain else None


def layer_choices(space: SearchSpace, layers: Sequence[LayerInfo]) -> list[LayerChoices]:
    """Each quantized layer's weight and activation choices (layers no rule covers stay float)."""
    names = [i.name for i in layers]
    check_rule_keys(space.weight_bits, names, "bits.weight", (FIRST_LAST, DEFAULT))
    check_rule_keys(space.act_bits, names, "bits.activation", (FIRST_LAST, DEFAULT))
    edges = set(first_last_names(list(layers)))
    out = []
    for name in names:
        w = _lookup(space.weight_bits, name, name in edges)
        a = _lookup(space.act_bits, name, name in edges)
        if w is None and a is None:
            continue
        if w is None or a is None:
            raise DfqError(
                f"layer {name!r} has {'activation' if w is None else 'weight'} bits only",
                name,
                "weight and activation choices for every quantized layer",
                "add a _default rule to both bits.weight and bits.activation",
            )
        out.append(LayerChoices(name, tuple(sorted(w)), tuple(sorted(a))))
    if not out:
        raise DfqError(
            "search space quantizes no layer", space.source, "rules covering layers", "add _default"
        )
    return out


LIMIT_KEYS = {"mean_weight_bits": "mean_weight_bits", "max_size_kib": "size_kib", "max_mbops": "mbops"}


class PlanSpace:
    """Layer choices + budget for one model: plans from parameters, costs, repair, warm starts."""

    def __init__(
        self,
        space: SearchSpace,
        layers: Sequence[LayerInfo],
        sensitivity: Mapping | None = None,
        act_sensitivity: Mapping | None = None,
    ) -> None:
        self.space, self.budget = space, space.budget
        self.layers = list(layers)
        self.choices = layer_choices(space, layers)
        self.sensitivity = {k: dict(v) for k, v in (sensitivity or {}).items()}
        self.act_sensitivity = {k: dict(v) for k, v in (act_sensitivity or {}).items()}
        self.limits = self._compute_limits()
        self.uniform_limit = next(
            (v for k, (_, v) in self.limits.items() if k.startswith("uniform_")), 0.0
        )  # the size (KiB) or BOPs (M) of the uniform plan a uniform_* limit names
        self._check_reachable()
        self._check_room()

    def cost(self, bits: Mapping[str, LayerBits]) -> dict[str, float]:
        c = layer_costs(self.layers, dict(bits))
        return {
            "size_kib": c.size_bits / 8192,
            "mbops": c.bops / 1e6,
            "mean_weight_bits": c.mean_weight_bits(bits),
        }

    def _compute_limits(self) -> dict[str, tuple[str, float]]:
        """Each limit of the budget: its cost key and its value (a uniform_* limit: that plan's cost)."""
        b, out = self.budget, {}
        for kind in b.kinds:
            if kind == "uniform_weight_bits":
                out[kind] = ("size_kib", self.cost(self.uniform(b.uniform_weight_bits, 8))["size_kib"])
            elif kind == "uniform_bops":
                from dfq_search.quant.plan import parse_bits

                bits = parse_bits(b.uniform_bops)
                out[kind] = ("mbops", self.cost(self.uniform(bits.w, bits.a))["mbops"])
            else:
                out[kind] = (LIMIT_KEYS[kind], float(getattr(b, kind)))
        return out

    def excesses(self, cost: Mapping[str, float]) -> list[float]:
        """How far over each limit (<= 0 within it), in that limit's unit."""
        return [cost[key] - limit for key, limit in self.limits.values()]

    def excess(self, cost: Mapping[str, float]) -> float:
        """How far over the budget (<= 0 within every limit): the largest of ``excesses``."""
        return max(self.excesses(cost), default=0.0)

    def _least(self) -> dict[str, LayerBits]:
        """The smallest plan: every layer at its lowest weight and activation bits."""
        return {c.name: LayerBits(c.w[0], c.a[0]) for c in self.choices}

    def _check_reachable(self) -> None:
        cost = self.cost(self._least())
        for kind, over in zip(self.limits, self.excesses(cost), strict=True):
            if over > 1e-9:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in cost.items())
                raise DfqError(
                    "impossible budget: even the smallest plan exceeds it",
                    f"budget.{kind}: {getattr(self.budget, kind)}",
                    f"the lowest bits of every layer cost {shown}",
                    "raise the budget or allow fewer bits",
                )

    def _check_room(self) -> None:
        """Refuse a budget that only the smallest plan fits while the space offers bit choices: every
        trial would be repaired to that one plan (a 2-bit-size budget with 2 as the lowest choice)."""
        least = self._least()
        raises = [{**least, c.name: LayerBits(c.w[1], c.a[0])} for c in self.choices if len(c.w) > 1]
        raises += [{**least, c.name: LayerBits(c.w[0], c.a[1])} for c in self.choices if len(c.a) > 1]
        if raises and all(self.excess(self.cost(b)) > 1e-9 for b in raises):
            kinds = ", ".join(f"budget.{k}: {getattr(self.budget, k)}" for k in self.limits)
            raise DfqError(
                "the budget leaves nothing to search: only the smallest plan (every layer at its lowest "
                "bits) fits, so every trial would run that one plan",
                kinds,
                "a budget that one layer's next bit choice fits under",
                "raise the budget, add lower bit choices (e.g. for the first/last layers), or give every "
                "layer a single choice to run just that plan",
            )

    def bits_from_params(self, params: Mapping[str, Any]) -> dict[str, LayerBits]:
        return {
            c.name: LayerBits(
                int(params.get(f"w:{c.name}", c.w[-1] if len(c.w) > 1 else c.w[0])),
                int(params.get(f"a:{c.name}", c.a[-1] if len(c.a) > 1 else c.a[0])),
            )
            for c in self.choices
        }

    def _moves(self, bits: dict[str, LayerBits], bops: bool) -> list[tuple[float, str, LayerBits]]:
        """Every one-step lowering of a layer's bits, least harm per bit saved first (``bops``: saved
        BOPs, activations included; else saved weight bits)."""
        info = {i.name: i for i in self.layers}
        moves = []
        for c in self.choices:
            b = bits[c.name]
            lower_w = [w for w in c.w if w < b.w]
            if lower_w:
                w = lower_w[-1]
                a_cost = FLOAT_BITS if info[c.name].reads_model_input else b.a  # as the cost model counts
                saved = info[c.name].macs * (b.w - w) * a_cost if bops else info[c.name].params * (b.w - w)
                harm = _harm(self.sensitivity.get(c.name, {}), b.w, w)
                moves.append((harm / saved - saved * 1e-18, c.name, LayerBits(w, b.a)))
            lower_a = [a for a in c.a if a < b.a]
            if bops and lower_a and not info[c.name].reads_model_input:  # a float input saves nothing
                a = lower_a[-1]
                saved = info[c.name].macs * b.w * (b.a - a)
                harm = _harm(self.act_sensitivity.get(c.name, {}), b.a, a)
                moves.append((harm / saved - saved * 1e-18, c.name, LayerBits(b.w, a)))
        return sorted(moves, key=lambda m: m[0])

    def repair(self, bits: Mapping[str, LayerBits]) -> dict[str, LayerBits]:
        """Lower bits, least harm per bit saved first, until the plan fits the budget."""
        bits = dict(bits)
        while (over := self._first_over(bits)) is not None:
            moves = self._moves(bits, bops=over == "mbops")
            if not moves:
                break
            _, name, new = moves[0]
            bits[name] = new
        return bits

    def _first_over(self, bits: Mapping[str, LayerBits]) -> str | None:
        """The cost key of the first limit ``bits`` exceed (None: it fits)."""
        over = zip(self.limits.values(), self.excesses(self.cost(bits)), strict=True)
        return next((key for (key, _), x in over if x > 1e-9), None)

    def evaluate(self, params: Mapping[str, Any]) -> tuple[BitPlan, dict[str, float], bool]:
        """The effective plan of sampled ``params``, its cost and whether it fits the budget."""
        bits = self.bits_from_params(params)
        if self.budget.repair:
            bits = self.repair(bits)
        cost = self.cost(bits)
        plan = BitPlan({n: {"w": b.w, "a": b.a} for n, b in bits.items()})
        return plan, cost, self.excess(cost) <= 1e-9

    def uniform(self, w: int, a: int) -> dict[str, LayerBits]:
        """Every layer at its choice nearest to ``w``/``a`` bits (budget not checked)."""
        return {c.name: LayerBits(_nearest(c.w, w), _nearest(c.a, a)) for c in self.choices}

    def params_of(self, bits: Mapping[str, LayerBits]) -> dict[str, int]:
        """The trial parameters that give ``bits`` (for warm starts)."""
        out = {}
        for c in self.choices:
            if len(c.w) > 1:
                out[f"w:{c.name}"] = bits[c.name].w
            if len(c.a) > 1:
                out[f"a:{c.name}"] = bits[c.name].a
        return out

    def uniform_bits(self) -> list[dict[str, LayerBits]]:
        """Uniform plans that fit the budget, by common weight bits (highest fitting activations each);
        layers that cannot take the bits keep their closest choice (e.g. a pinned first/last layer)."""
        common = sorted({w for c in self.choices for w in c.w if len(c.w) > 1}, reverse=True)
        common = common or [min(w for c in self.choices for w in c.w)]  # one plan: it is the uniform one
        acts = sorted({a for c in self.choices for a in c.a}, reverse=True)
        out = []
        for w in common:
            for a in acts:
                bits = self.uniform(w, a)
                if self.excess(self.cost(bits)) <= 1e-9:
                    out.append(bits)
                    break
        return out


def _harm(omega: Mapping[int, float], bits: int, lower: int) -> float:
    """The rise of a layer's sensitivity from ``bits`` to ``lower`` (1.0 where it is not known)."""
    return max(omega[lower] - omega[bits], 0.0) if lower in omega and bits in omega else 1.0


def _nearest(choices: tuple[int, ...], want: int) -> int:
    return min(choices, key=lambda c: (abs(c - want), -c))


class SpaceFunction:
    """The define-by-run search space for ``OptunaSearch`` (a picklable callable of an Optuna trial)."""

    def __init__(self, plans: PlanSpace, seed: int = 0) -> None:
        self.plans, self.seed = plans, seed

    def __call__(self, trial: Any) -> dict[str, Any]:
        params = {}
        for c in self.plans.choices:
            if len(c.w) > 1:
                params[f"w:{c.name}"] = trial.suggest_categorical(f"w:{c.name}", list(c.w))
            if len(c.a) > 1:
                params[f"a:{c.name}"] = trial.suggest_categorical(f"a:{c.name}", list(c.a))
        constants: dict[str, Any] = {}
        for knob in self.plans.space.knobs():
            value = knob.suggest(trial)
            if knob.fixed:
                constants[knob.name] = value
        plan, cost, feasible = self.plans.evaluate(params)
        if not self.plans.budget.repair:  # Optuna's constraints (TPE, NSGA-II, GP steer away from > 0)
            for kind, over in zip(self.plans.limits, self.plans.excesses(cost), strict=True):
                trial.set_constraint(kind, over)
        return {**constants, "plan": plan.to_dict(), "cost": cost, "feasible": feasible, "seed": self.seed}
