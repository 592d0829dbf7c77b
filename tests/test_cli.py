import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dfq_search.cli import main


@pytest.fixture(autouse=True)
def _cache(shared_cache, monkeypatch):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(shared_cache))


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "dfq_search.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("run", "eval", "quantize", "layers", "models"):
        assert cmd in proc.stdout


def test_baseline_reports_fp_and_quantized_accuracy(capsys):
    code, out, _ = run_cli(capsys, "baseline", "--bits", "W8A8", "W2A4")
    assert code == 0
    fp = float(out.split("full precision top-1 ")[1].split("%")[0])
    assert fp > 90
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("W8A8", "W2A4"))}
    assert abs(float(rows["W8A8"][1]) - fp) < 1.5  # 8 bits costs (almost) nothing
    assert float(rows["W2A4"][1]) < float(rows["W8A8"][1])


def test_quantize_writes_a_checkpoint_that_eval_reloads(capsys, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"_default": {"w": 4, "a": 4}, "re:head.*": {"w": 8, "a": 8}}))
    ckpt = tmp_path / "q.pt"
    code, out, _ = run_cli(capsys, "quantize", "--plan", str(plan), "--out", str(ckpt))
    assert code == 0 and ckpt.is_file(), out
    top1 = float(_table(out)["top1"])
    assert ckpt.with_suffix(".onnx").is_file() and float(_table(out)["onnx_agreement"]) >= 99.0  # onnxruntime
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", str(ckpt))
    assert code == 0
    assert abs(float(out.splitlines()[2].split()[2]) - top1) < 1e-6  # same model, same score


def test_layers_lists_every_layer_with_bits(capsys):
    code, out, _ = run_cli(capsys, "layers", "--bits", "W4A4", "--protocol", "ptq")
    assert code == 0
    lines = out.splitlines()[2:]
    assert lines[0].split()[4:6] == ["8", "32"]  # the first layer reads the float image
    assert lines[-1].split()[4:6] == ["8", "8"]  # the last layer pinned to 8 bits by the protocol


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    not_folder = tmp_path / "flat"
    not_folder.mkdir()
    (not_folder / "a.txt").write_text("x")
    bad_plan = tmp_path / "bad.yaml"
    bad_plan.write_text(yaml.safe_dump({"_default": {"w": 4, "a": 4}, "conv9": {"w": 4, "a": 4}}))
    evil = tmp_path / "evil.pt"
    torch.save({"x": print}, evil)  # a pickle of a callable: refused by weights_only
    return {
        "unknown model": (["eval", "--model", "resnet_20"], "unknown model"),
        "missing weights": (
            ["eval", "--model", "cifar_resnet20", "--weights", str(tmp_path / "no.th")],
            "not found",
        ),
        "evil weights": (
            ["eval", "--model", "cifar_resnet20", "--weights", str(evil), "--data", str(not_folder)],
            "weights",
        ),
        "unknown layer": (["eval", "--plan", str(bad_plan)], "lacks"),
        "bits outside the set": (["eval", "--bits", "W7A4"], "not allowed"),
        "bad bits form": (["baseline", "--bits", "4bit"], "WxAy"),
        "not an image folder": (["eval", "--data", str(not_folder)], "ImageFolder"),
        "missing data": (["eval", "--data", str(tmp_path / "nowhere")], "nowhere"),
        "cuda without gpu": (["eval", "--device", "cuda"], "GPU"),
        "bad device": (["eval", "--device", "tpu"], "device"),
        "unknown protocol": (["eval", "--bits", "W4A4", "--protocol", "gdfq"], "protocol"),
        "missing checkpoint": (["eval", "--checkpoint", str(tmp_path / "none.pt")], "not found"),
        "plan and bits": (["eval", "--plan", str(bad_plan), "--bits", "W4A4"], "both"),
    }


def test_bad_inputs_give_one_line_and_exit_2(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the cuda case needs a machine without a GPU")
    for case, (argv, needle) in _bad_inputs(tmp_path).items():
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, case
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dfq-search: error:"), (case, err)
        assert needle in lines[0] and "Fix:" in lines[0], (case, lines[0])


def test_console_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dfq_search.cli", "eval", "--model", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown model" in proc.stderr


HELPER = "dfq_user_model_helper:build"  # tests/models/dfq_user_model_helper.py: 1-channel 16x16 BN CNN
GRAY = ["--input-size", "16", "--mean", "0.5", "--std", "0.25"]


def _gray_folder(root: Path, per_class: int = 3) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (16, 16), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / c / f"{i}.png")
    return root


def test_a_grayscale_user_model_from_the_command_line_alone(capsys, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "models"))
    data = _gray_folder(tmp_path / "gray")
    model = ["--model", HELPER, "--num-classes", "2", *GRAY]
    code, out, err = run_cli(capsys, "layers", *model, "--bits", "W4A4")
    assert code == 0 and "0.weight" not in err, err
    code, out, err = run_cli(capsys, "eval", *model, "--data", str(data))
    assert code == 0, err
    ckpt = tmp_path / "q.pt"
    code, out, err = run_cli(capsys, "quantize", *model, "--bits", "W8A8", "--calib", str(data), "--data",
                             str(data), "--out", str(ckpt))  # fmt: skip
    assert code == 0 and ckpt.is_file(), err
    code, again, err = run_cli(capsys, "eval", "--checkpoint", str(ckpt), "--data", str(data))
    assert code == 0, err  # rebuilt at 1x16x16 from what the checkpoint recorded: the same model
    assert float(again.splitlines()[2].split()[2]) == float(_table(out)["top1"])

    code, _, err = run_cli(capsys, "eval", "--model", HELPER, "--data", str(data))  # 3x32x32 by default
    assert code == 2 and "failed on an input of shape (2, 3, 32, 32)" in err and "--mean" in err
    code, _, err = run_cli(capsys, "eval", "--model", "digits_cnn", "--input-size", "28")
    assert code == 2 and "contradicts digits_cnn" in err and "Traceback" not in err


def test_a_campaign_takes_the_preprocessing_flags_over_its_space(tmp_path, monkeypatch):
    from dfq_search.search.campaign import CampaignOptions, prepare
    from dfq_search.search.space import parse_space, with_model_flags

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "models"))
    space = parse_space({
        "model": {"name": "tiny_resnet", "input_size": 24},
        "bits": {"weight": {"_default": [4, 8]}, "activation": {"_default": [8]}},
        "method": {"kind": "ptq", "ptq": {"modcap_k": 0, "recon.iters": 2}},
        "samples": {"source": "gaussian", "calibration": 8, "heldout": 8},
    })  # fmt: skip
    flags = {"input_size": 16, "mean": (0.5,), "std": (0.25,), "resize": None}
    mine = with_model_flags(space, HELPER, flags)
    assert (mine.model.input_size, mine.model.mean) == (16, (0.5,))
    assert with_model_flags(space, HELPER, {}).model.input_size is None  # written for tiny_resnet: dropped
    assert with_model_flags(space, None, {}).model.input_size == 24  # no --model: the space's own
    prep = prepare(CampaignOptions(mine, model=HELPER, num_classes=2), tmp_path / "run", runner=None)
    assert (
        prep.bundle.preprocess.shape == prep.ctx.input_shape == tuple(prep.ctx.calib.shape[1:]) == (1, 16, 16)
    )
    assert prep.meta["preprocess"] == {"input_size": 16, "resize": None, "mean": [0.5], "std": [0.25]}


def _table(out: str) -> dict[str, str]:
    """The one-row table a command printed, as {column: value}."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return dict(zip(lines[head].split(), lines[head + 2].split(), strict=True))


def test_quantize_with_a_data_free_method_writes_what_eval_reads(capsys, tmp_path):
    fast = ["--bits", "W4A4", "--samples", "gaussian", "--calib-images", "32", "--heldout", "16"]
    ckpt = tmp_path / "ptq.pt"
    code, out, err = run_cli(
        capsys,
        "quantize",
        "--method",
        "ptq",
        "--recon-iters",
        "5",
        *fast,
        "--modcap-k",
        "1",
        "--set",
        "ptq.recon.qdrop=0.5",
        "--out",
        str(ckpt),
    )
    assert code == 0 and ckpt.is_file(), err
    row = _table(out)
    assert row["method"] == "ptq" and 0 <= float(row["agreement_P"]) <= 100 and float(row["mse_P"]) >= 0
    assert "first" not in row and float(row["bits_per_param"]) > 4  # the ptq protocol: first/last at 8
    code, again, err = run_cli(capsys, "eval", "--checkpoint", str(ckpt))
    assert code == 0 and float(again.splitlines()[2].split()[2]) == float(row["top1"]), err

    both = tmp_path / "both.pt"
    code, out, err = run_cli(
        capsys,
        "quantize",
        "--method",
        "ptq+finetune",
        "--recon-iters",
        "5",
        *fast,
        "--finetune-preset",
        "gdfq",
        "--finetune-iters",
        "12",
        "--set",
        "finetune.train.warmup=4",
        "finetune.train.batch_size=8",
        "--out",
        str(both),
    )
    assert code == 0 and both.is_file() and _table(out)["method"] == "ptq+finetune", err

    distilled = tmp_path / "distilled.pt"
    code, out, err = run_cli(capsys, "quantize", "--method", "ptq+distill", "--recon-iters", "5", *fast,
                             "--set", "distill.steps=4", "distill.batch_size=8", "distill.lr=1e-3",
                             "--out", str(distilled))  # fmt: skip
    assert code == 0 and distilled.is_file() and _table(out)["method"] == "ptq+distill", err


def test_quantize_on_generator_samples_keeps_them_in_a_bank(capsys, tmp_path):
    fast = ["--bits", "W4A4", "--calib-images", "16", "--heldout", "8", "--recon-iters", "2", "--no-eval"]
    code, out, err = run_cli(capsys, "quantize", "--method", "ptq", "--samples", "generator:dsg", *fast,
                             "--out", str(tmp_path / "g.pt"))  # fmt: skip
    assert code == 0 and "samples: 16 calibration + 8 held-out (bank " in out, err
    code, again, err = run_cli(capsys, "quantize", "--method", "ptq", "--samples", "generator:dsg", *fast,
                               "--out", str(tmp_path / "g2.pt"))  # fmt: skip
    assert code == 0 and "  step " not in again, err  # the bank had them: no generator step ran again
    code, _, err = run_cli(capsys, "quantize", "--method", "ptq", "--samples", "generator:adadfq", *fast,
                           "--out", str(tmp_path / "g3.pt"))  # fmt: skip
    assert code == 2 and "one of gdfq, dsg, lrq" in err


def test_quantize_with_real_images_as_the_reference(capsys, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "models"))
    data = _gray_folder(tmp_path / "gray")
    ckpt = tmp_path / "real.pt"
    code, out, err = run_cli(
        capsys,
        "quantize",
        "--model",
        HELPER,
        "--num-classes",
        "2",
        *GRAY,
        "--data",
        str(data),
        "--method",
        "ptq",
        "--recon-iters",
        "3",
        "--samples",
        f"real:{data}",
        "--calib-images",
        "4",
        "--heldout",
        "2",
        "--bits",
        "W4A4",
        "--out",
        str(ckpt),
    )
    assert code == 0 and ckpt.is_file() and "samples: 4 calibration + 2 held-out (real images)" in out, err


@pytest.mark.parametrize("model", ["tv:mobilenet_v3_small", "timm:tf_efficientnet_lite0"])
def test_a_torchvision_or_timm_model_at_another_size_through_ptq(capsys, tmp_path, model):
    if model.startswith("timm:"):
        pytest.importorskip("timm", reason="timm models need the [timm] extra (in [test])")
    from dfq_search.checkpoint import load_quantized

    ckpt = tmp_path / "q.pt"
    argv = [
        "--model",
        model,
        "--num-classes",
        "10",
        "--input-size",
        "32",
        "--method",
        "ptq",
        "--recon-iters",
        "1",
    ]
    fast = ["--samples", "gaussian", "--calib-images", "8", "--heldout", "4", "--bits", "W4A4", "--no-eval"]
    code, _, err = run_cli(capsys, "quantize", *argv, *fast, "--out", str(ckpt))
    assert code == 0 and ckpt.with_suffix(".onnx").is_file(), err
    q, meta = load_quantized(ckpt)  # rebuilt by its name, at the size it was quantized for
    assert meta["model"] == model and meta["preprocess"].shape == (3, 32, 32)
    assert q(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
