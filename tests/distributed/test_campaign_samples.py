"""A campaign's shared samples on a local Ray: generator workers fill the buffer and the bank; a rerun
reloads the bank without generating; a killed buffer shard is rebuilt from the bank; a generator worker
killed mid-run is restarted and the generation completes."""

from __future__ import annotations

import threading

import pytest
import torch

ray = pytest.importorskip("ray")

from dfq_search.bank import SampleBank  # noqa: E402
from dfq_search.distributed import init, shutdown  # noqa: E402
from dfq_search.distributed.campaign import generator_samples  # noqa: E402
from dfq_search.distributed.session import NAMESPACE  # noqa: E402
from dfq_search.models import create_model  # noqa: E402
from dfq_search.search.space import Resources, Samples  # noqa: E402

CFG = Samples(source="generator", generators=("gdfq",), generator_steps=40, keep_after=5, calibration=64,
              heldout=16)  # fmt: skip
KEPT = 35 * 32  # (steps - keep_after) x the preset's batch


@pytest.fixture(scope="module")
def ray_session():
    init(num_cpus=2)
    yield
    shutdown()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny_cnn")


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def generated(ray_session, tiny, tmp_path_factory):
    """One generation for the module: (bank, draw, held-out); the other tests reload the bank."""
    bank = str(tmp_path_factory.mktemp("campaign_bank") / "bank")
    draw, held, _, origin = generator_samples(tiny, CFG, bank, "fill-a", Resources(), quiet)
    return bank, draw, held, origin


def test_generation_fills_the_bank_and_a_rerun_reloads_it(generated, tiny):
    bank, draw, held, origin = generated
    assert "written through" in origin and len(held) == CFG.heldout
    assert SampleBank.open(bank).info()["samples"] == KEPT
    x = draw(CFG.calibration)
    assert x.shape == (CFG.calibration, *tiny.preprocess.shape) and x.dtype == torch.float32
    draw2, held2, _, origin2 = generator_samples(tiny, CFG, bank, "fill-b", Resources(), quiet)
    assert "no generation" in origin2
    assert torch.equal(held, held2)  # drawn from the same published generator, same seed
    assert len(draw2(32)) == 32


def test_a_killed_buffer_shard_is_rebuilt_from_the_bank(generated, tiny):
    draw, *_ = generator_samples(tiny, CFG, generated[0], "rebuild", Resources(), quiet)
    shard = ray.get_actor("rebuild/0", namespace=NAMESPACE)
    ray.kill(shard, no_restart=False)
    x = draw(48)  # retried until the restarted shard has reloaded the bank
    assert len(x) == 48
    assert ray.get(shard.stats.remote())["filled"] == KEPT


def test_a_generator_worker_killed_mid_run_is_restarted(ray_session, tiny, tmp_path, patience):
    bank = str(tmp_path / "bank")
    cfg = Samples(**{**CFG.__dict__, "generator_steps": 120})
    out = {}
    runner = threading.Thread(
        target=lambda: out.setdefault("r", generator_samples(tiny, cfg, bank, "kill", Resources(), quiet))
    )
    runner.start()

    def at_step_60() -> bool:
        try:
            worker = ray.get_actor("kill/worker/gdfq-0", namespace=NAMESPACE)
            return ray.get(worker.status.remote())["step"] >= 60
        except ValueError:  # not started yet
            return False

    patience.wait_for("the generator worker to reach step 60", at_step_60, 120, alive=runner.is_alive)
    worker = ray.get_actor("kill/worker/gdfq-0", namespace=NAMESPACE)
    ray.kill(worker, no_restart=False)
    runner.join(timeout=patience(300))
    assert "r" in out, "the generation did not complete after the worker was killed"
    assert SampleBank.open(bank).info()["samples"] >= (120 - 5) * 32


@ray.remote(num_cpus=0.25)
def _reader(name: str, draws: int, n: int) -> list[int]:
    from dfq_search.distributed.campaign import BufferDraw

    draw = BufferDraw(name)
    return [len(draw(n)) for _ in range(draws)]


def test_the_buffer_serves_eight_concurrent_readers(generated, tiny, patience):
    generator_samples(tiny, CFG, generated[0], "readers", Resources(), quiet)
    got = ray.get([_reader.remote("readers", 20, 64) for _ in range(8)], timeout=patience(300))
    assert got == [[64] * 20] * 8  # every request of every reader served in full


def test_a_fine_tuning_trial_warm_starts_from_the_shared_generator(generated, tiny):
    from dfq_search.quant import trace_layers
    from dfq_search.search.define import PlanSpace, SpaceFunction
    from dfq_search.search.objective import FidelityScorer
    from dfq_search.search.space import parse_space
    from dfq_search.search.trial import TrialContext, run_trial

    draw, held, *_ = generator_samples(tiny, CFG, generated[0], "warm", Resources(), quiet)
    state = draw.generator_state("gdfq")
    assert state is not None and state["step"] == CFG.generator_steps
    assert draw.generator_state("lrq") is None  # no worker trained that architecture
    space = parse_space({
        "bits": {"weight": {"_default": [4]}, "activation": {"_default": [4]}},
        "method": {"kind": "qat", "qat": {"train.iterations": 53, "train.warmup": 50, "train.batch_size": 8}},
        "objective": {"reports": 2},
    })  # fmt: skip
    plans = PlanSpace(space, trace_layers(tiny.model, tiny.preprocess.example_input()))
    config = SpaceFunction(plans)(_Fixed())
    ctx = TrialContext(tiny.model, tiny.name, tiny.num_classes, tiny.preprocess.shape, None,
                       FidelityScorer(tiny.model, held), reports=2, draw=draw, calibration=32)  # fmt: skip
    reports = []
    final = run_trial(config, ctx, lambda m, folder: reports.append(m))
    assert final["generator_warm_start"] == 1.0 and len(reports) == 2


class _Fixed:
    def suggest_categorical(self, name, choices):
        return choices[0]
