"""The generator half of the game, its warm start of a trial's game, and resumable bank generation."""

from __future__ import annotations

import pytest
import torch

from dfq_search.bank import (
    BankHeader,
    SampleBank,
    SourceTrainer,
    WorkerConfig,
    generate_into_bank,
    share_warmups,
    warm_start,
    warmup_name,
)
from dfq_search.errors import DfqError
from dfq_search.fingerprint import model_fingerprint
from dfq_search.models import create_model
from dfq_search.qat import Game
from dfq_search.qat.start import start_q
from dfq_search.quant import BitPlan

OVR = ["train.batch_size=8"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny_cnn", None, 10)


def test_trainer_is_the_games_warmup_and_warm_starts_a_game(tiny):
    shape, cfg = tiny.preprocess.shape, WorkerConfig(seed=3, overrides=OVR)
    trainer = SourceTrainer(tiny.model, cfg, shape, 10)
    for _ in range(3):
        trainer.step()
    game_cfg = cfg.game_config()
    game_cfg.train.iterations, game_cfg.train.warmup = 10, 5
    q = start_q(tiny.model, BitPlan.uniform(4, 4), shape, start="track")
    game = Game(tiny.model, q, game_cfg, shape, 10)
    game.run(until=3)  # three generator-only warm-up steps
    for key, value in game.source.state_dict().items():
        assert torch.equal(value, trainer.source.state_dict()[key]), key
    fresh = Game(
        tiny.model, start_q(tiny.model, BitPlan.uniform(4, 4), shape, start="track"), game_cfg, shape, 10
    )
    warm_start(fresh, trainer.state_dict())
    assert fresh.step == 5 and torch.equal(fresh.source.fc.weight, trainer.source.fc.weight)
    assert fresh.opt_g.state_dict()["state"][0]["step"] == 3  # Adam's moments came along
    fresh.run(until=6)
    assert fresh.q_steps == 1  # the next step after the shared warm-up is already a Q step


def test_fork_continues_the_generator_with_its_own_seed_and_clock(tiny):
    shape = tiny.preprocess.shape
    leader = SourceTrainer(tiny.model, WorkerConfig(seed=0, overrides=OVR), shape, 10)
    for _ in range(3):
        leader.step()
    state = leader.state_dict()
    follower = SourceTrainer(tiny.model, WorkerConfig(seed=5, overrides=OVR), shape, 10)
    follower.fork(state)
    assert follower.step_count == 3 and follower.seconds == follower.cpu_seconds == 0.0
    assert torch.equal(follower.source.fc.weight, leader.source.fc.weight)
    assert follower.opt.state_dict()["state"][0]["step"] == 3  # Adam's moments came along
    mine, theirs = follower.step()[0], leader.step()[0]
    assert not torch.equal(mine.y, theirs.y) or not torch.allclose(mine.x, theirs.x)  # own latent draws
    assert follower.step_count == leader.step_count == 4 and follower.seconds > 0


def test_worker_config_refuses_unknown_keys_and_q_terms(tiny):
    with pytest.raises(DfqError, match="did you mean 'steps'"):
        WorkerConfig.from_dict({"step": 3})
    with pytest.raises(DfqError, match="need Q"):
        SourceTrainer(tiny.model, WorkerConfig(preset="adadfq"), tiny.preprocess.shape, 10)
    assert WorkerConfig(seed=1).generator_hash() == WorkerConfig(seed=2).generator_hash()
    assert WorkerConfig().generator_hash() != WorkerConfig(preset="lrq").generator_hash()


def test_generate_into_bank_extends_and_resumes(tiny, tmp_path):
    header = BankHeader(model_fingerprint(tiny.model), tiny.preprocess.shape, 10, "tiny_cnn")
    bank = SampleBank.create(str(tmp_path / "bank"), header)
    cfg = WorkerConfig(name="g", steps=100, chunk=16, overrides=OVR)
    seen = []
    first = generate_into_bank(tiny.model, bank, cfg, 24, progress=seen.append)
    assert first["samples"] == 24 and first["step"] == 3 and seen[-1]["samples"] == 24
    second = generate_into_bank(tiny.model, bank, cfg, 40)  # a new run picks up where the first stopped
    assert second["samples"] == 40 and second["step"] == 5
    steps = torch.cat([s.step for s in bank.iter_samples()])
    assert steps.tolist() == sorted(steps.tolist()) and int(steps.max()) == 4  # steps 0..4, no restart
    assert [v.step for v in bank.generator_versions("g")][-1] == 5
    assert generate_into_bank(tiny.model, bank, cfg, 40)["step"] == 5  # nothing left to do


def test_generators_of_one_config_share_the_warmup_in_a_bank(tiny, tmp_path, monkeypatch):
    from dfq_search.bank.generate import SourceTrainer

    trained = []  # the generator steps each call trains (counted, not timed: a busy machine's clock lies)
    real_step = SourceTrainer.step
    monkeypatch.setattr(SourceTrainer, "step", lambda self: (trained.append(1), real_step(self))[1])
    header = BankHeader(model_fingerprint(tiny.model), tiny.preprocess.shape, 10, "tiny_cnn")
    bank = SampleBank.create(str(tmp_path / "bank"), header)
    configs = share_warmups([WorkerConfig(name=f"g{s}", seed=s, steps=100, keep_after=3, chunk=16,
                                          overrides=OVR) for s in (0, 1)])  # fmt: skip
    assert configs[1].fork_from == "g0"
    lead = generate_into_bank(tiny.model, bank, configs[0], 16)
    warm = bank.generator_versions(warmup_name("g0"))
    assert [v.step for v in warm] == [3] and lead["step"] == 5 and len(trained) == 5
    trained.clear()
    follow = generate_into_bank(tiny.model, bank, configs[1], 16)
    assert follow["step"] == 5 and len(trained) == 2  # two steps from the shared warm-up, not five
    steps = {g: sorted({int(s) for sh in bank.iter_samples() if sh.generator == g for s in sh.step})
             for g in ("g0", "g1")}  # fmt: skip
    assert steps == {"g0": [3, 4], "g1": [3, 4]}
    g1 = next(s for s in bank.iter_samples() if s.generator == "g1").x
    g0 = next(s for s in bank.iter_samples() if s.generator == "g0").x
    assert not torch.equal(g0, g1)  # the fork samples with its own seed
    assert bank.info()["samples_per_generator"] == {"g0": 16, "g1": 16}
