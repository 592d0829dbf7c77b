"""One searchable setting: fixed, a categorical choice, or a numeric range, and its Optuna suggestion.

In a search-space file a knob is written as

    modcap_k: 1                                  # fixed
    modcap_k: [0, 1, 2]                          # categorical (bit widths are always categorical: Ray's
                                                 # integer ranges exclude the upper bound, Optuna's
                                                 # include it)
    sample_loss.lambda_l: {low: 0.0, high: 0.4}  # a float range; add `log: true` for a log scale,
                                                 # `int: true` for an integer one
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dfq_search.errors import DfqError, refuse_unknown_keys

RANGE_KEYS = ("low", "high", "log", "int")


@dataclass(frozen=True)
class Knob:
    """A setting named ``name``: ``choices`` (one choice = fixed) or a range [low, high]."""

    name: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def fixed(self) -> bool:
        return self.low is None and len(self.choices) == 1

    @property
    def value(self) -> Any:
        """The value of a fixed knob."""
        return self.choices[0]

    def suggest(self, trial: Any) -> Any:
        """The value for an Optuna trial (a fixed knob is not a parameter of the trial)."""
        if self.fixed:
            return self.value
        if self.low is not None:
            if self.integer:
                return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def values(self) -> tuple[Any, ...]:
        """Every value it can take (the two ends of a range)."""
        if self.low is None:
            return self.choices
        return (int(self.low), int(self.high)) if self.integer else (self.low, self.high)


def parse_knob(name: str, raw: Any, check: Callable[[Any], Any] | None = None) -> Knob:
    """A :class:`Knob` from its YAML form; ``check`` validates (and may convert) each value."""
    check = check or (lambda v: v)
    if isinstance(raw, dict):
        refuse_unknown_keys(f"range of {name!r}", raw, RANGE_KEYS)
        if "low" not in raw or "high" not in raw:
            raise DfqError(f"range of {name!r}", raw, "a mapping with low and high", "add low: and high:")
        low, high = check(raw["low"]), check(raw["high"])
        if not isinstance(low, (int, float)) or isinstance(low, bool) or not low <= high:
            raise DfqError(f"range of {name!r}", raw, "numbers with low <= high", "fix the range")
        if raw.get("int") and not (float(low).is_integer() and float(high).is_integer()):
            raise DfqError(f"int range of {name!r}", raw, "whole-number ends", "write low, high as integers")
        if raw.get("log") and low <= 0:
            raise DfqError(f"log range of {name!r}", raw, "low > 0 on a log scale", "raise low or drop log")
        return Knob(name, (), float(low), float(high), bool(raw.get("log")), bool(raw.get("int")))
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise DfqError(f"choices of {name!r}", raw, "at least one value", "list one or more values")
    checked = tuple(check(v) for v in values)
    if len(set(map(repr, checked))) != len(checked):
        raise DfqError(f"choices of {name!r}", raw, "distinct values", "remove the repeated value")
    return Knob(name, checked)


def one_of(name: str, allowed: tuple[Any, ...]) -> Callable[[Any], Any]:
    """A check that a value is among ``allowed``."""

    def check(value: Any) -> Any:
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise DfqError(name, value, f"one of {list(allowed)}", f"pick one of {list(allowed)}")
        return value

    return check


def number(name: str, low: float, high: float, integer: bool = False) -> Callable[[Any], Any]:
    """A check that a value is a number (an int when ``integer``) in [low, high]."""

    def check(value: Any) -> Any:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML reads 1e-3 as a string
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            kind = "an int" if integer else "a number"
            raise DfqError(name, value, f"{kind} in [{low}, {high}]", f"give {kind} in that interval")
        return value

    return check
