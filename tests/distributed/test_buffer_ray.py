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


def test_two_workers_fill_serve_spill_and_reload(ray_session, tiny, tmp_path, patience):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("fill", 4096, shape, 10, shards=2, namespace="dfq_search_tests")
    pool = WorkerPool([worker("gdfq-a", 0, 12, keep_after=2), worker("lrq-b", 1, 12, preset="lrq")],
                      tiny.model, shape, 10, buf)  # fmt: skip
    pool.run()
    done = pool.wait(timeout=patience(120))
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


def test_killed_worker_restarts_and_resumes_while_buffer_serves(ray_session, tiny, patience):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("kill", 100_000, shape, 10, namespace="dfq_search_tests")
    pool = WorkerPool([worker("w", 0, 150)], tiny.model, shape, 10, buf)
    pool.run()
    patience.wait_for("worker w to publish step 10", lambda: buf.latest_generator("w") is not None
                      and buf.latest_generator("w")[1]["step"] >= 10, 60)  # fmt: skip
    pool.kill("w", restart=True)
    assert len(buf.sample(64)) == 64  # the buffer keeps serving while the worker is down
    done = pool.wait(timeout=patience(120))["w"]
    assert done["reconstructed"] and done["resumed_from"] >= 10 and done["step"] == 150
    assert buf.stats()["filled"] > 0 and len(buf.sample(64)) == 64
    held = buf.sample(buf.stats()["filled"])  # everything held (without replacement)
    per_step = torch.bincount(held.step)  # samples are tagged with their 0-based step
    assert len(per_step) == 150 and set(per_step.tolist()) == {BATCH}  # none missing, none sent twice
    assert buf.last_step("w") == 149 and buf.last_step("nobody") == -1
    pool.shutdown()


def test_worker_pauses_when_buffer_full_and_on_request(ray_session, tiny, patience):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("full", 3 * BATCH, shape, 10, namespace="dfq_search_tests")
    pool = WorkerPool([worker("p", 0, 10_000)], tiny.model, shape, 10, buf)
    pool.run()
    patience.wait_for("the worker to wait on the full buffer", lambda: pool.status()["p"]["waiting_full"], 60)
    step = pool.status()["p"]["step"]
    time.sleep(patience(0.5))
    assert pool.status()["p"]["step"] <= step + 2 * 2  # at most the chunk in flight
    assert buf.stats()["filled"] == 3 * BATCH
    pool.pause()
    buf.set_refresh(True)  # a refreshing buffer wants samples again: only the explicit pause holds it
    time.sleep(patience(0.5))  # a step in flight ends within it, even under load
    paused_step = pool.status()["p"]["step"]
    time.sleep(patience(0.5))  # a step in flight ends within it, even under load
    assert pool.status()["p"]["step"] == paused_step
    pool.resume()
    patience.wait_for(
        "the resumed worker to step on", lambda: pool.status()["p"]["step"] > paused_step + 2, 60
    )
    assert buf.stats()["evicted"] > 0  # FIFO eviction once full
    pool.stop()
    assert pool.wait(timeout=patience(60))["p"]["step"] < 10_000
    pool.shutdown()


def test_workers_of_one_config_train_the_warmup_once(ray_session, tiny, patience):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("fork", 4096, shape, 10, namespace="dfq_search_tests")
    configs = [worker(f"g{i}", i, 10, keep_after=4) for i in range(3)] + [worker("l", 3, 10, preset="lrq",
                                                                                 keep_after=4)]  # fmt: skip
    pool = WorkerPool(configs, tiny.model, shape, 10, buf, cpus_per_worker=0.5)  # all four run at once
    assert [c.fork_from for c in pool.configs.values()] == [None, "g0", "g0", None]  # lrq: its own warm-up
    pool.run()
    done = pool.wait(timeout=patience(120))
    assert {n: d["forked_at"] for n, d in done.items()} == {"g0": None, "g1": 4, "g2": 4, "l": None}
    assert all(d["step"] == 10 for d in done.values())
    held = buf.stats()["shards"][0]["held_per_generator"]
    assert held == {"g0": 6 * BATCH, "g1": 6 * BATCH, "g2": 6 * BATCH, "l": 6 * BATCH}
    batch = buf.sample(len(configs) * 6 * BATCH)
    assert int(batch.step.min()) >= 4
    x = {g: batch.x[[b == g for b in batch.generator]] for g in ("g1", "g2")}
    assert not torch.equal(x["g1"].sort(0).values, x["g2"].sort(0).values)  # forks sample apart
    pool.shutdown()
    unforked = WorkerPool(configs[:2], tiny.model, shape, 10, buf, share_warmup=False)
    assert [c.fork_from for c in unforked.configs.values()] == [None, None]
    unforked.shutdown()


def test_a_fork_from_a_resumed_leader_trains_its_own_warmup(ray_session, tiny, patience):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("fork-resumed", 4096, shape, 10, namespace="dfq_search_tests")
    from dfq_search.bank import SourceTrainer

    lead = worker("r0", 0, 12, keep_after=4)
    trainer = SourceTrainer(tiny.model, lead, shape, 10)
    for _ in range(6):  # a previous run got past the warm-up; only its step-6 state survives
        trainer.step()
    buf.publish("r0", 6, trainer.state_dict(), {"config_hash": lead.generator_hash()})
    pool = WorkerPool([lead, worker("r1", 1, 12, keep_after=4)], tiny.model, shape, 10, buf)
    pool.run()
    done = pool.wait(timeout=patience(120))
    assert done["r0"]["resumed_from"] == 6 and done["r1"]["forked_at"] is None
    assert done["r1"]["step"] == 12 and done["r1"]["generator_cpu_seconds"] > 0
    pool.shutdown()


def test_a_fork_whose_leader_is_gone_trains_its_own_warmup(ray_session, tiny, patience):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("fork-gone", 4096, shape, 10, namespace="dfq_search_tests")
    pool = WorkerPool([worker("d0", 0, 8, keep_after=4), worker("d1", 1, 8, keep_after=4)], tiny.model, shape,
                      10, buf)  # fmt: skip
    pool.kill("d0", restart=False)
    pool.run()
    done = ray.get(pool.runs["d1"], timeout=patience(120))
    assert done["forked_at"] is None and done["step"] == 8
    pool.shutdown()


def test_fork_from_must_name_a_warmup_of_the_same_config(ray_session, tiny):
    shape = tiny.preprocess.shape
    buf = SampleBuffer.start("fork-bad", 64, shape, 10, namespace="dfq_search_tests")
    bad = [worker("a", 0, 10, keep_after=4), worker("b", 1, 10, keep_after=4, fork_from="nobody")]
    with pytest.raises(DfqError, match="fork_from names no worker.*'nobody'"):
        WorkerPool(bad, tiny.model, shape, 10, buf)
    other = [worker("a", 0, 10, keep_after=4), worker("b", 1, 10, preset="lrq", keep_after=4, fork_from="a")]
    with pytest.raises(DfqError, match="another generator config"):
        WorkerPool(other, tiny.model, shape, 10, buf)


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
