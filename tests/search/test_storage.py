"""Campaign storage: a folder used as is; a URI mirrored locally (file:// URIs stand in for s3://)."""

from __future__ import annotations

import pytest

from dfq_search.errors import DfqError
from dfq_search.search.storage import CampaignStore, is_uri


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_folder_is_used_as_is(tmp_path):
    store = CampaignStore.at(tmp_path / "runs", "c1")
    assert store.uri is None and store.local == (tmp_path / "runs" / "c1").resolve()
    assert store.tune_storage == str((tmp_path / "runs").resolve())
    assert store.location("bank") == str(store.local / "bank")
    assert CampaignStore.of(tmp_path / "runs" / "c1") == store
    assert not store.exists()
    store.pull(), store.push(), store.reset()  # no-ops: nothing is copied or deleted
    assert not store.local.exists()


def test_a_uri_is_mirrored_under_the_cache(tmp_path, cache):
    uri = f"file://{tmp_path}/remote"
    store = CampaignStore.at(uri + "/", "c1")
    assert store.uri == f"{uri}/c1" and store.local.is_relative_to(cache)
    assert store.tune_storage == uri and store.location("bank") == f"{uri}/c1/bank"
    assert CampaignStore.of(f"{uri}/c1") == store
    assert CampaignStore.at(f"file://{tmp_path}/other", "c1").local != store.local
    assert is_uri("s3://b/k") and not is_uri(tmp_path) and not is_uri("runs")


def test_push_sends_only_the_drivers_files_and_pull_keeps_them(tmp_path, cache):
    store = CampaignStore.at(f"file://{tmp_path}/remote", "c1")
    store.check_remote()
    remote = tmp_path / "remote" / "c1"
    assert not list((tmp_path / "remote").iterdir())  # the write probe is gone, no campaign folder yet
    store.local.mkdir(parents=True)
    (store.local / "campaign.json").write_text("{}")
    (store.local / "tensorboard" / "t1").mkdir(parents=True)
    (store.local / "tensorboard" / "t1" / "events").write_text("new")
    (store.local / "trial_a").mkdir()
    (store.local / "trial_a" / "result.json").write_text("stale copy")
    store.push()
    assert store.exists() and (remote / "tensorboard" / "t1" / "events").read_text() == "new"
    assert not (remote / "trial_a").exists()  # Tune's files are written by Tune, never by the driver

    (remote / "trial_b" / "checkpoint_000000").mkdir(parents=True)  # a worker's trial
    (remote / "trial_b" / "checkpoint_000000" / "model.pt").write_text("m")
    (remote / "trial_b" / "result.json").write_text("r")
    (remote / "tensorboard" / "t1" / "events").write_text("old")
    (remote / "bank" / "shards").mkdir(parents=True)  # the generator workers' bank: read at the URI
    store.pull()
    assert not (store.local / "bank").exists()
    assert (store.local / "trial_b" / "result.json").read_text() == "r"
    checkpoint = store.local / "trial_b" / "checkpoint_000000"
    assert not checkpoint.exists()  # checkpoints come when they are read
    store.fetch(checkpoint)
    assert (checkpoint / "model.pt").read_text() == "m"
    store.fetch(store.local / "trial_c" / "checkpoint_000000")  # not there either: nothing happens
    assert (store.local / "tensorboard" / "t1" / "events").read_text() == "new"  # the driver's: kept
    store.reset()
    assert not store.local.exists() and store.exists()  # the mirror only


def test_a_bad_uri_is_refused_with_what_is_allowed(cache):
    with pytest.raises(DfqError, match="storage URI not understood") as err:
        CampaignStore.at("nosuch://bucket/p", "c1").check_remote()
    assert "s3://bucket/prefix" in err.value.allowed
