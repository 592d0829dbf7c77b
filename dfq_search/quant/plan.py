"""Per-layer bit plans: which weight and activation bits every Conv2d/Linear layer gets.

A plan is a mapping of rules, in the style of torchao's ``FqnToConfig``::

    _default: {w: 4, a: 4}        # every layer not matched otherwise
    conv1: {w: 8, a: 8}           # an exact layer name (as in ``model.named_modules()``)
    're:layer3\\..*': {w: 3}      # a regular expression (``re.fullmatch``) on the layer name

Each field (``w``, ``a``) is resolved on its own, by precedence: the exact name, then the first
matching ``re:`` rule (in the plan's order) that sets the field, then ``_default``. A layer that no
rule covers stays in full precision; a layer with only one of the two fields is an error. Names
and patterns that match no layer are refused (a typo would otherwise be silently ignored).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from dfq_search.errors import DfqError, close_matches
from dfq_search.quant.quantizers import ALLOWED_BITS

DEFAULT_KEY = "_default"
V = TypeVar("V")
FIELDS = ("w", "a")
_PLAN_FIX = "write each rule as NAME: {w: BITS, a: BITS}"


@dataclass(frozen=True)
class LayerBits:
    """The bits of one layer: ``w`` for its weight, ``a`` for its input activation."""

    w: int
    a: int


def check_bits(bits: object, where: str) -> int:
    """Return ``bits`` if it is an allowed bit width, else raise a DfqError naming ``where``."""
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise DfqError(
            f"bit width of {where} not allowed", bits, f"allowed: {list(ALLOWED_BITS)}",
            "use one of the allowed bit widths",
        )  # fmt: skip
    return int(bits)  # type: ignore[arg-type]


def parse_bits(text: str) -> LayerBits:
    """Parse ``"W4A4"`` (case-insensitive) into ``LayerBits(4, 4)``."""
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", text.strip())
    if m is None:
        raise DfqError("bits spec", text, "the form WxAy, e.g. W4A4", "write e.g. --bits W4A4")
    return LayerBits(check_bits(int(m[1]), text), check_bits(int(m[2]), text))


class BitPlan:
    """An immutable, validated set of per-layer bit rules (see the module docstring)."""

    def __init__(self, rules: Mapping[str, Mapping[str, int]]) -> None:
        if not isinstance(rules, Mapping):
            raise DfqError("bit plan must be a mapping", type(rules).__name__, _PLAN_FIX, _PLAN_FIX)
        self._rules: dict[str, dict[str, int]] = {}
        for key, value in rules.items():
            self._rules[str(key)] = self._check_rule(key, value)

    @staticmethod
    def _check_rule(key: object, value: object) -> dict[str, int]:
        if not isinstance(key, str) or not key:
            raise DfqError("bit plan key", key, "a layer name, 're:<regex>' or '_default'", _PLAN_FIX)
        if not isinstance(value, Mapping) or not value:
            raise DfqError(f"bit plan rule {key!r}", value, "a mapping with w and/or a", _PLAN_FIX)
        unknown = set(value) - set(FIELDS)
        if unknown:
            bad = sorted(map(str, unknown))[0]
            raise DfqError(
                f"unknown field in bit plan rule {key!r}{close_matches(bad, FIELDS)}", bad,
                "fields: w (weight bits), a (activation bits)", _PLAN_FIX,
            )  # fmt: skip
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as err:
                raise DfqError("bad regular expression", key, str(err), "fix the pattern") from None
        return {f: check_bits(value[f], f"{key}.{f}") for f in FIELDS if f in value}

    @classmethod
    def uniform(cls, w: int, a: int) -> BitPlan:
        """Every layer at ``w``-bit weights and ``a``-bit activations."""
        return cls({DEFAULT_KEY: {"w": w, "a": a}})

    def with_rules(self, rules: Mapping[str, Mapping[str, int]]) -> BitPlan:
        """A new plan with ``rules`` added (replacing rules of the same key)."""
        return BitPlan({**self._rules, **rules})

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self._rules.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitPlan) and self._rules == other._rules

    def __hash__(self) -> int:
        return hash(tuple((k, tuple(sorted(v.items()))) for k, v in self._rules.items()))

    def __repr__(self) -> str:
        return f"BitPlan({self._rules})"

    def resolve(self, layer_names: Sequence[str]) -> dict[str, LayerBits]:
        """The bits of every covered layer of ``layer_names`` (uncovered layers stay float)."""
        check_rule_keys(self._rules, layer_names, "bit plan")
        resolved: dict[str, LayerBits] = {}
        for name in layer_names:
            chain = rule_chain(self._rules, name)  # each field from the first rule that sets it
            bits = {f: next((r[f] for r in chain if f in r), None) for f in FIELDS}
            if bits["w"] is None and bits["a"] is None:
                continue
            if bits["w"] is None or bits["a"] is None:
                missing = "w" if bits["w"] is None else "a"
                raise DfqError(
                    f"layer {name!r} has no {missing!r} bits in the plan", bits,
                    "every quantized layer needs both w and a",
                    f"add {missing} to a rule that covers it, or to {DEFAULT_KEY}",
                )  # fmt: skip
            resolved[name] = LayerBits(bits["w"], bits["a"])
        return resolved

    def save(self, path: str | Path) -> None:
        """Write the plan as YAML (rules in their precedence order)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        """Read a plan written by :meth:`save` (or by hand)."""
        path = Path(path)
        if not path.is_file():
            raise DfqError("bit plan file not found", str(path), "an existing YAML file", "check it")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            msg = str(err).replace("\n", " ")
            raise DfqError("bit plan is not valid YAML", str(path), msg, "fix the YAML") from None
        return cls(data)


def rule_chain(rules: Mapping[str, V], name: str, groups: Collection[str] = ()) -> list[V]:
    """The rules that cover layer ``name``, in precedence order: its exact name, the group keys it
    belongs to (``groups``: e.g. a search space's ``_first_last`` for the edge layers), the matching
    ``re:`` rules in the rules' order, then ``_default``. The one matcher of plans and search spaces."""
    chain = [rules[name]] if name in rules else []
    chain += [rules[g] for g in groups if g in rules]
    chain += [v for k, v in rules.items() if k.startswith("re:") and re.fullmatch(k[3:], name)]
    return chain + ([rules[DEFAULT_KEY]] if DEFAULT_KEY in rules else [])


def check_rule_keys(
    keys: Iterable[str], layer_names: Sequence[str], what: str, special: Collection[str] = (DEFAULT_KEY,)
) -> None:
    """Refuse a rule key that covers no layer of ``layer_names``: a name the model lacks (with close
    matches) or a ``re:`` pattern matching none (a typo would otherwise be silently ignored);
    ``special`` keys (``_default``, groups) cover layers by meaning."""
    names = set(layer_names)
    for key in keys:
        if key in special:
            continue
        if key.startswith("re:"):
            if not any(re.fullmatch(key[3:], n) for n in layer_names):
                raise DfqError(
                    f"{what} pattern matches no layer", key, f"layers: {_shown(layer_names)}",
                    "fix the pattern or remove the rule (see 'dfq-search layers')",
                )  # fmt: skip
        elif key not in names:
            raise DfqError(
                f"{what} names a layer the model lacks{close_matches(key, names)}", key,
                f"layers: {_shown(layer_names)}", "use a layer name from 'dfq-search layers', or 're:'",
            )  # fmt: skip


def _shown(names: Sequence[str], limit: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
