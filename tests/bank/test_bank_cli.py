"""``dfq-search generate`` and ``dfq-search bank info``, through their argparse definitions."""

from __future__ import annotations

import argparse

from dfq_search import commands_bank
from dfq_search.bank import SampleBank
from dfq_search.cli import build_parser


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_generate_is_resumable_and_info_reports(tmp_path, capsys):
    path = str(tmp_path / "bank")
    base = ["generate", "--model", "tiny_cnn", "--bank", path, "--batch-size-gen", "8", "--keep-after", "1",
            "--shard-rows", "16", "--seeds", "0", "1"]  # fmt: skip
    assert commands_bank.cmd_generate(parse([*base, "--samples", "16"])) == 0
    out = capsys.readouterr().out
    assert "gdfq-s1: step 3, 16 samples" in out  # progress lines: keep-after 1, two steps of 8
    assert commands_bank.cmd_generate(parse([*base, "--samples", "32"])) == 0
    info = SampleBank.open(path).info()
    assert info["samples_per_generator"] == {"gdfq-s0": 32, "gdfq-s1": 32}
    # resumed at 3, not restarted; gdfq-s1 forked from gdfq-s0's warm-up (step 1) in the first run
    assert info["latest_generator_steps"] == {"gdfq-s0": 5, "gdfq-s1": 5, "gdfq-s0@warmup": 1}
    assert commands_bank.cmd_bank(parse(["bank", "info", path, "--verify"])) == 0
    out = capsys.readouterr().out
    assert "verified 4 shards: 0 damaged" in out and "gdfq-s0" in out
