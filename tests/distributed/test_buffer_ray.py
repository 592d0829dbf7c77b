"""Generator workers and the sample buffer on one local Ray session (ray.init(num_cpus=2)), tiny model."""

from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")

from dfq_search.bank import BankHeader, SampleBank, WorkerConfig  # noqa: E402
from dfq_search.distributed import SampleBuffer, WorkerPool, init, shutdown  # noqa: E402
from dfq_search.errors import DfqError  # noqa: E402
from dfq_search.fingerprint import model_fingerprint  # noqa: E402
from dfq_search.models import create_model  # noqa: E402

BATCH = 16


@pytest.fixture(scope="module")
def ray_session():
    init(num_cpus=2, namespace="dfq_search_tests")
    yield
    shutdown()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny_cnn", None, 10)


def worker(name: str, seed: int, steps: int, **kw) -> WorkerConfig:
    return WorkerConfig(name=name, seed=seed, steps=steps, chunk=2 * BATCH, publish_every=5,
                        overrides=[f"train.batch_size={BATCH}"], **kw)  # fmt: skip


def test_two_workers_fill_serve_spill_and_reload(ray_session, tiny, tmp_path):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("fill", 4096, shape, 10, shards=2, namespace="dfq_search_tests")
    pool = WorkerPool([worker("gdfq-a", 0, 12, keep_after=2), worker("lrq-b", 1, 12, preset="lrq")],
                      tiny.model, shape, 10, buf)  # fmt: skip
    pool.run()
    done = pool.wait(timeout=120)
    assert {d["step"] for d in done.values()} == {12}
    trial_side = SampleBuffer.connect("fill", namespace="dfq_search_tests")  # a trial reaches it by name
    st = trial_side.stats()
    assert st["filled"] == st["added"] == (10 + 12) * BATCH and st["evicted"] == 0
    held = [s["held_per_generator"] for s in st["shards"]]
    assert sum(h.get("gdfq-a", 0) for h in held) == 10 * BATCH
    batch = trial_side.sample(256)
    assert batch.x.shape == (256, *shape) and batch.x.dtype == torch.float16
    assert set(batch.generator) == {"gdfq-a", "lrq-b"} and 0 <= int(batch.y.min()) <= int(batch.y.max()) < 10
    assert int(batch.step[[g == "gdfq-a" for g in batch.generator]].min()) >= 2  # keep_after honoured
    with torch.no_grad():  # the stored logits are P's on these samples (up to float16 pixels)
        agree = (tiny.model(batch.x.float()).argmax(1) == batch.logits.argmax(1)).float().mean()
    assert agree > 0.95
    assert trial_side.stats()["served"] == 256
    state, meta = trial_side.latest_generator("lrq-b")
    assert meta["step"] == 12 and state["step"] == 12 and any("lka" in k for k in state["source"])
    header = BankHeader(model_fingerprint(tiny.model), shape, 10, "tiny_cnn")
    assert buf.spill(str(tmp_path / "bank"), header) == st["filled"]
    assert buf.spill(str(tmp_path / "bank"), header) == 0  # each sample is written once
    assert SampleBank.open(str(tmp_path / "bank")).info()["samples"] == st["filled"]
    second = SampleBuffer.start("reload", 4096, shape, 10, namespace="dfq_search_tests")
    assert second.load_bank(str(tmp_path / "bank"), header.fingerprint) == st["filled"]  # no generation
    assert second.stats()["filled"] == st["filled"] and len(second.sample(32)) == 32
    with pytest.raises(DfqError, match="fingerprint mismatch"):
        second.load_bank(str(tmp_path / "bank"), "0" * 16)
    pool.shutdown()


def _wait(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_killed_worker_restarts_and_resumes_while_buffer_serves(ray_session, tiny):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("kill", 100_000, shape, 10, namespace="dfq_search_tests")
    pool = WorkerPool([worker("w", 0, 150)], tiny.model, shape, 10, buf)
    pool.run()
    _wait(lambda: buf.latest_generator("w") is not None and buf.latest_generator("w")[1]["step"] >= 10)
    pool.kill("w", restart=True)
    assert len(buf.sample(64)) == 64  # the buffer keeps serving while the worker is down
    done = pool.wait(timeout=120)["w"]
    assert done["reconstructed"] and done["resumed_from"] >= 10 and done["step"] == 150
    assert buf.stats()["filled"] > 0 and len(buf.sample(64)) == 64
    pool.shutdown()


def test_worker_pauses_when_buffer_full_and_on_request(ray_session, tiny):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("full", 3 * BATCH, shape, 10, namespace="dfq_search_tests")
    pool = WorkerPool([worker("p", 0, 10_000)], tiny.model, shape, 10, buf)
    pool.run()
    _wait(lambda: pool.status()["p"]["waiting_full"])
    step = pool.status()["p"]["step"]
    time.sleep(0.5)
    assert pool.status()["p"]["step"] <= step + 2 * 2  # at most the chunk in flight
    assert buf.stats()["filled"] == 3 * BATCH
    pool.pause()
    buf.set_refresh(True)  # a refreshing buffer wants samples again: only the explicit pause holds it
    time.sleep(0.5)
    paused_step = pool.status()["p"]["step"]
    time.sleep(0.5)
    assert pool.status()["p"]["step"] == paused_step
    pool.resume()
    _wait(lambda: pool.status()["p"]["step"] > paused_step + 2)
    assert buf.stats()["evicted"] > 0  # FIFO eviction once full
    pool.stop()
    assert pool.wait(timeout=60)["p"]["step"] < 10_000
    pool.shutdown()


def test_cli_generate_on_ray_workers_resumes_from_the_bank(ray_session, tmp_path):
    from dfq_search import commands_bank
    from dfq_search.cli import build_parser

    parse = build_parser().parse_args

    path = str(tmp_path / "bank")
    base = ["generate", "--model", "tiny_cnn", "--bank", path, "--batch-size-gen", "8", "--keep-after", "0",
            "--seeds", "0", "1", "--workers", "2", "--progress-every", "1"]  # fmt: skip
    assert commands_bank.cmd_generate(parse([*base, "--samples", "16"])) == 0
    assert commands_bank.cmd_generate(parse([*base, "--samples", "32"])) == 0
    info = SampleBank.open(path).info()
    assert info["samples_per_generator"] == {"gdfq-s0": 32, "gdfq-s1": 32}
    assert info["latest_generator_steps"] == {"gdfq-s0": 4, "gdfq-s1": 4}
