"""The classifiers users bring, from the command line alone: torchvision's ImageNet families (random
weights, small inputs, two classes) through ``layers``, ``eval``, ``quantize --method ptq`` and ``eval
--checkpoint``; a model without BatchNorm refused where samples are synthesized; a 2-trial campaign on
a torchvision model. The same commands at 224 pixels are timed by ``benchmarks/zoo_timing.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dfq_search.cli import main

ZOO = ["tv:resnet18", "tv:resnet50", "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:efficientnet_b0",
       "tv:regnet_x_400mf"]  # fmt: skip
SMALL = ["--num-classes", "2", "--input-size", "32"]


@pytest.fixture(autouse=True)
def _cache(shared_cache, monkeypatch):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(shared_cache))


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> Path:
    """An ImageFolder of 2 classes x 3 random 40x40 RGB images (resized and cropped to 32)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb")
    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(3):
            pixels = torch.randint(0, 256, (40, 40, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _row(out: str) -> dict[str, str]:
    """The one-row table a command printed, as {column: value}."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return dict(zip(lines[head].split(), lines[head + 2].split(), strict=True))


@pytest.mark.parametrize("model", ZOO)
def test_a_torchvision_family_through_every_command(capsys, tmp_path, rgb, model):
    argv = ["--model", model, *SMALL]
    code, out, err = run_cli(capsys, "layers", *argv, "--bits", "W4A4")
    assert code == 0 and len(out.splitlines()) > 10, err
    code, out, err = run_cli(capsys, "eval", *argv, "--data", str(rgb))
    assert code == 0 and _row(out)["images"] == "6" and _row(out)["agreement"] == "100.00", err
    ckpt = tmp_path / "q.pt"
    fast = ["--samples", "gaussian", "--calib-images", "8", "--heldout", "4", "--recon-iters", "1"]
    code, out, err = run_cli(capsys, "quantize", *argv, "--bits", "W4A4", "--method", "ptq", *fast,
                             "--data", str(rgb), "--out", str(ckpt))  # fmt: skip
    assert code == 0 and ckpt.with_suffix(".onnx").is_file(), err
    quantized = _row(out)
    # rebuilt from what the checkpoint recorded (the model and its 32-pixel input), not the default model
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(ckpt), "--data", str(rgb))
    assert code == 0 and _row(out)["model"] == model and _row(out)["top1"] == quantized["top1"], err


def test_eval_of_a_checkpoint_refuses_flags_that_contradict_it(capsys, tmp_path, rgb):
    ckpt = tmp_path / "q.pt"
    code, _, err = run_cli(capsys, "quantize", "--model", "tv:mobilenet_v3_small", *SMALL, "--bits", "W8A8",
                           "--no-eval", "--no-onnx", "--out", str(ckpt))  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(ckpt), "--data", str(rgb), "--input-size",
                           "64")  # fmt: skip
    assert code == 2 and "--input-size contradicts the checkpoint" in err and "32" in err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(ckpt), "--model", "tv:resnet18")
    assert code == 2 and "'tv:mobilenet_v3_small'" in err and "Traceback" not in err


def test_a_model_without_batchnorm_is_refused_where_samples_are_synthesized(capsys, tmp_path):
    argv = ["quantize", "--model", "tv:convnext_tiny", *SMALL, "--bits", "W4A4", "--method", "ptq",
            "--no-eval", "--out", str(tmp_path / "c.pt")]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "has no BatchNorm" in err and "LayerNorm" in err and "--samples real:DIR" in err
    assert not (tmp_path / "c.pt").exists()


def test_a_two_trial_campaign_on_a_torchvision_model(tmp_path, shared_cache, patience):
    argv = [sys.executable, "-m", "dfq_search.cli", "run", "--space", "tiny_smoke", "--model",
            "tv:mobilenet_v3_small", *SMALL, "--trials", "2", "--storage", str(tmp_path), "--num-cpus", "2",
            "--name", "tv"]  # fmt: skip
    env = {**os.environ, "DFQ_SEARCH_CACHE": str(shared_cache)}
    proc = patience.run(argv, "the 2-trial campaign", 300, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "tv"
    rows = pq.read_table(run / "results.parquet").to_pylist()
    assert len(rows) == 2 and any(r["status"] == "complete" for r in rows), rows
    meta = json.loads((run / "campaign.json").read_text())
    assert meta["model"] == "tv:mobilenet_v3_small" and meta["preprocess"]["input_size"] == 32, meta
    from dfq_search.checkpoint import load_quantized

    q, saved = load_quantized(run / "best_model.pt")
    assert saved["model"] == "tv:mobilenet_v3_small" and q(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
