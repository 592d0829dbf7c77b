"""Settings named by dotted paths into nested configs (``recon.iters``, ``sample_loss.weights.bns``).

A search knob, a ``--set`` override and a config file all name a setting the same way: by its path in
the typed config that owns it. ``nest`` turns ``{path: value}`` into the nested mapping the configs'
``from_dict``/``load_config`` read; ``lookup`` reads the value at a path of a built config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dfq_search.errors import DfqError


def nest(paths: Mapping[str, Any]) -> dict[str, Any]:
    """``{"recon.iters": 5, "modcap_k": 1}`` as ``{"recon": {"iters": 5}, "modcap_k": 1}``."""
    out: dict[str, Any] = {}
    for path, value in paths.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DfqError("setting path", path, "paths that do not pass through a value", "fix the path")
        node[leaf] = value
    return out


def lookup(config: Any, path: str) -> Any:
    """The value at ``path`` of a (nested) dataclass or mapping; ``KeyError`` when it has none."""
    node = config
    for part in path.split("."):
        if isinstance(node, Mapping):
            node = node[part]
        elif hasattr(node, "__dataclass_fields__") and part in node.__dataclass_fields__:
            node = getattr(node, part)
        else:
            raise KeyError(path)
    return node
