"""User-facing errors: one message that says what was wrong, the value, what is allowed and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class DfqError(ValueError):
    """A mistake in the user's input (a file, a name, a value), never an internal bug.

    The CLI prints ``str(error)`` on one line and exits with status 2, without a traceback.
    """

    def __init__(self, what: str, value: Any, allowed: str, fix: str) -> None:
        self.what, self.value, self.allowed, self.fix = what, value, allowed, fix
        super().__init__(f"{what}: got {value!r}; {allowed}. Fix: {fix}")


def close_matches(name: str, options: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' hint for ``name`` among ``options``, or '' when nothing is close."""
    found = difflib.get_close_matches(name, list(options), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(map(repr, found))}?)" if found else ""


def unknown_name(kind: str, name: str, valid: Iterable[str], fix: str) -> DfqError:
    """The error for a name that is not among ``valid``: lists the valid ones and the closest."""
    valid = sorted(valid)
    shown = ", ".join(valid[:30]) + (f", ... ({len(valid)} in all)" if len(valid) > 30 else "")
    return DfqError(f"unknown {kind}{close_matches(name, valid)}", name, f"valid: {shown}", fix)


def refuse_unknown_keys(kind: str, keys: Iterable[object], allowed: Iterable[str]) -> None:
    """Raise for the first of ``keys`` not in ``allowed`` (a config key, a YAML field), with a suggestion."""
    allowed = list(allowed)
    for key in keys:
        if key not in allowed:
            raise DfqError(
                f"unknown {kind} key{close_matches(str(key), allowed)}", key,
                f"valid keys: {', '.join(allowed)}", "fix the spelling or remove the key",
            )  # fmt: skip
