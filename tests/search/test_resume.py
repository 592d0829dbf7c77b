"""A resumed campaign keeps its settings: a changed space or flag is refused, naming what changed."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from dfq_search.errors import DfqError
from dfq_search.search.resume import check_resumed
from dfq_search.search.space import load_space


@pytest.fixture
def started(tmp_path):
    """campaign.json as a campaign of tiny_smoke writes it (its settings as plain JSON)."""
    space = load_space("tiny_smoke")
    path = tmp_path / "campaign.json"
    resolved = json.loads(json.dumps(asdict(space), default=str))
    path.write_text(json.dumps({"search": asdict(space.search), "space_resolved": resolved}))
    return path, space


def test_the_same_settings_resume(started):
    path, space = started
    check_resumed(path, space, space.search)
    check_resumed(path.with_name("nothing.json"), space, replace(space.search, trials=9))  # not started


def test_refinement_and_resources_may_change(started):
    path, space = started
    search = replace(space.search, refine_top=5, refine_seeds=4)
    check_resumed(
        path, replace(space, resources=replace(space.resources, trial_cpu=2), search=search), search
    )


def test_what_tune_would_keep_is_refused_naming_each_change(started):
    path, space = started
    with pytest.raises(DfqError, match=r"search.trials: 3 -> 7, search.sampler: tpe -> random"):
        check_resumed(path, space, replace(space.search, trials=7, sampler="random"))
    other = replace(space, objective=replace(space.objective, reports=1))
    with pytest.raises(DfqError, match=r"objective.reports: 2 -> 1.*--name NEW"):
        check_resumed(path, other, other.search)


def test_settings_an_older_campaign_did_not_record_are_not_compared(started):
    path, space = started
    meta = json.loads(path.read_text())
    del meta["space_resolved"]["objective"]["reports"], meta["search"]["seed"]
    path.write_text(json.dumps(meta))
    other = replace(space, objective=replace(space.objective, reports=1))
    check_resumed(path, other, replace(other.search, seed=5))


def test_a_campaign_from_before_knobs_were_config_paths_is_refused_with_how_to_rerun(started):
    path, space = started
    meta = json.loads(path.read_text())
    meta["space_resolved"]["ptq"] = {"iters": {"name": "ptq.iters", "choices": [5]}}  # as it stored them
    path.write_text(json.dumps(meta))
    with pytest.raises(DfqError, match=r"before search knobs became config paths.*recon.iters.*--name NEW"):
        check_resumed(path, space, space.search)
