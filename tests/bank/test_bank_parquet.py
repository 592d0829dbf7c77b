"""The Parquet sample bank: bit-exact round trips, fingerprints, damaged and half-written shards."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
from pyarrow._fs import _MockFileSystem

from dfq_search.bank import BankHeader, CorruptShard, SampleBank, Samples
from dfq_search.errors import DfqError
from dfq_search.fingerprint import config_hash, model_fingerprint
from dfq_search.models import create_model

SHAPE = (3, 8, 8)


def samples(n: int, seed: int = 0, name: str = "g0") -> Samples:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=gen) * 3
    return Samples(x, torch.randint(10, (n,), generator=gen), torch.arange(n) + 100, torch.randn(n, 10), name)


def bank_at(tmp_path, encoding: str = "float16") -> SampleBank:
    return SampleBank.create(str(tmp_path / "bank"), BankHeader("f" * 16, SHAPE, 10, "m", encoding))


def test_float16_shard_round_trips_bit_exact(tmp_path):
    bank, s = bank_at(tmp_path), samples(37)
    entry = bank.write_shard(s, "cfg")
    got = SampleBank.open(str(tmp_path / "bank"), "f" * 16).read(entry)
    assert got.x.dtype == torch.float16 and torch.equal(got.x, s.x.half())
    assert torch.equal(got.y, s.y) and torch.equal(got.step, s.step) and torch.equal(got.logits, s.logits)
    assert got.generator == "g0" and (entry.rows, entry.first_step, entry.last_step) == (37, 100, 136)


def test_uint8_shard_within_half_a_level(tmp_path):
    bank, s = bank_at(tmp_path, "uint8"), samples(20)
    got = bank.read(bank.write_shard(s))
    level = (s.x.amax(dim=(0, 2, 3)) - s.x.amin(dim=(0, 2, 3))) / 255
    assert ((got.x - s.x).abs() <= level.view(1, -1, 1, 1) / 2 + 1e-5).all()


def test_any_pyarrow_filesystem(tmp_path):
    fs = _MockFileSystem()  # an in-memory pyarrow filesystem standing in for object storage
    bank = SampleBank.create("bucket/bank", BankHeader("a" * 16, SHAPE, 10), fs=fs)
    bank.write_shard(samples(5, 1))
    bank.write_shard(samples(7, 2))
    again = SampleBank.open("bucket/bank", "a" * 16, fs=fs)
    assert [len(s) for s in again.iter_samples()] == [5, 7]
    assert again.info()["samples"] == 12 and again.info()["shards"] == 2


def test_fingerprint_tracks_weights_and_architecture_and_mismatch_is_refused(tmp_path):
    torch.manual_seed(0)
    a = create_model("tiny_cnn", None, 10).model
    b = create_model("tiny_resnet", None, 10).model
    fa = model_fingerprint(a)
    assert fa == model_fingerprint(a) and fa != model_fingerprint(b)
    with torch.no_grad():
        next(a.parameters()).view(-1)[0] += 1e-6
    assert model_fingerprint(a) != fa
    assert config_hash({"x": 1, "y": [1, 2]}) == config_hash({"y": [1, 2], "x": 1}) != config_hash({"x": 2})
    bank_at(tmp_path)
    with pytest.raises(DfqError, match="another model") as err:
        SampleBank.open(str(tmp_path / "bank"), fa)
    assert "Fix:" in str(err.value)
    with pytest.raises(DfqError, match="format differs"):
        SampleBank.create(str(tmp_path / "bank"), BankHeader("f" * 16, SHAPE, 10, "m", "uint8"))
    with pytest.raises(DfqError, match="no sample bank"):
        SampleBank.open(str(tmp_path / "nothing"))


def test_truncated_or_corrupted_shard_is_never_served(tmp_path):
    bank = bank_at(tmp_path)
    _good, bad, flipped = (bank.write_shard(samples(10, i)) for i in range(3))
    root = tmp_path / "bank"
    data = (root / bad.file).read_bytes()
    (root / bad.file).write_bytes(data[: len(data) // 2])
    raw = bytearray((root / flipped.file).read_bytes())
    raw[len(raw) // 3] ^= 0x01  # one flipped bit in the pixels: Parquet itself would not notice
    (root / flipped.file).write_bytes(bytes(raw))
    for entry in (bad, flipped):
        with pytest.raises(CorruptShard, match="checksum"):
            bank.read(entry)
    served = list(bank.iter_samples())
    assert len(served) == 1 and torch.equal(served[0].x, samples(10, 0).x.half())


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    import dfq_search.bank.bank as B
    from dfq_search.bank import BankHeader, SampleBank, Samples
    mode, real = sys.argv[2], B.write_atomic
    def dying(fs, path, data):
        if mode == "mid-shard" and path.endswith(".parquet"):
            with fs.open_output_stream(path + ".dead.tmp") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "before-index" and "/index/" in path:
            os.kill(os.getpid(), signal.SIGKILL)
        real(fs, path, data)
    B.write_atomic = dying
    bank = SampleBank.open(sys.argv[1])
    x = torch.randn(50, 3, 8, 8)
    bank.write_shard(Samples(x, torch.zeros(50, dtype=torch.long), torch.zeros(50, dtype=torch.long)))
""")


@pytest.mark.parametrize("mode", ["mid-shard", "before-index"])
def test_killed_writer_leaves_no_readable_partial_shard(tmp_path, mode, patience):
    bank = bank_at(tmp_path)
    bank.write_shard(samples(4))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = patience.run(
        [sys.executable, "-c", KILLER, str(tmp_path / "bank"), mode], "the dying writer", 120, env=env
    )
    assert proc.returncode == -9  # the writer died by SIGKILL in the middle of its write
    left = {p.name for p in (tmp_path / "bank" / "shards").iterdir()}
    assert len(left) == 2  # the first shard and the dead writer's leftover, which must not be served
    assert [len(s) for s in bank.iter_samples()] == [4] and bank.info()["samples"] == 4
