"""What a resumed campaign may change. ``Tuner.restore`` keeps the searcher, the trial count and the
space function of the campaign's start whatever the command now says, so a resume that asks for other
settings is refused with the settings it would change, instead of silently running the old ones.
Resources and refinement may change (they are read again on resume)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dfq_search.errors import DfqError
from dfq_search.search.space import Search, SearchSpace

RESUME_FIXED = ("trials", "sampler", "seed", "concurrency")  # of search: Tune restores them
RESUME_FREE = ("search", "resources", "source")  # besides RESUME_FIXED, these may change


def check_resumed(campaign_json: Path, space: SearchSpace, search: Search) -> None:
    """Refuse to resume the campaign of ``campaign_json`` with another ``space`` or ``search`` (the
    effective one, flags included); settings an older version did not record are not compared."""
    if not campaign_json.is_file():
        return
    before = json.loads(campaign_json.read_text())
    old_knobs = before.get("space_resolved", {}).get("ptq", {})
    if "iters" in old_knobs:  # every campaign before issue 15 stored its PTQ knobs by short name
        raise DfqError(
            "a campaign from before search knobs became config paths cannot resume",
            str(campaign_json.parent),
            "a campaign started by this version ('dfq-search report' still reads this one)",
            "rerun it with the space rewritten (iters -> recon.iters, ...) and --name NEW",
        )  # fmt: skip
    was = {**before.get("space_resolved", {}), "search": before.get("search", {})}
    samples = was.get("samples") or {}
    if "iterations" in samples:  # recorded before it was samples.direct.iterations (issue 15)
        was["samples"] = {**samples, "direct": {"iterations": samples["iterations"]}}
    now = json.loads(json.dumps({**asdict(space), "search": asdict(search)}, default=str))
    keep = {f"search.{k}" for k in RESUME_FIXED}
    old, new = _leaves(was), _leaves(now)
    changed = [
        k for k in new if k in old and old[k] != new[k] and (k in keep or k.split(".")[0] not in RESUME_FREE)
    ]
    if changed:
        raise DfqError(
            "a resumed campaign cannot change its settings",
            ", ".join(f"{k}: {old[k]} -> {new[k]}" for k in changed),
            "the settings the campaign started with (resources and refinement may change)",
            "resume with the same space and flags, or start another campaign with --name NEW",
        )


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}".lstrip(".")).items()}
