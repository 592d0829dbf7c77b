"""A corpus of bad inputs across the CLI and its files: each one exits with 2 and one line.

Every case runs ``dfq_search.cli.main`` in this process and checks that stderr is exactly one line
``dfq-search: error: ...`` naming the offending value and saying ``Fix:``, that no traceback escapes,
and that files which existed before the command (a campaign, a bank, the input files themselves) are
byte for byte the same after it. Each case fails before any heavy compute (about a second at most).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from dfq_search.cli import main
from dfq_search.search.space import SPACE_DIR

SHARED = Path(os.environ.get("DFQ_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TINY = yaml.safe_load((SPACE_DIR / "tiny_smoke.yaml").read_text())


@dataclass
class Case:
    argv: list[str]
    needles: tuple[str, ...]  # every one appears in the error line (the value or its name)
    keep: list[Path] = field(default_factory=list)  # existing files/folders that must stay unchanged
    absent: list[Path] = field(default_factory=list)  # outputs that must not have been started


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _space(t: Path, edit: Callable[[dict], object] | None = None, raw: str | None = None) -> Path:
    """A tiny_smoke space file with ``edit`` applied (or ``raw`` text)."""
    data = copy.deepcopy(TINY)
    if edit is not None:
        edit(data)
    return _write(t / "space.yaml", raw if raw is not None else yaml.safe_dump(data))


def _run(t: Path, space: Path | str, *extra: str) -> list[str]:
    return ["run", "--space", str(space), "--storage", str(t / "store"), *extra]


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, leaf = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    return edit


def _folder(t: Path, classes: int, name: str = "imgs") -> Path:
    from PIL import Image

    root = t / name
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 * c, 0, 0)).save(root / f"c{c}" / "0.png")
    return root


def _state_dict(t: Path, model: str, name: str, num_classes: int | None = None) -> Path:
    from dfq_search.models import create_model

    path = t / name
    torch.save(create_model(model, num_classes=num_classes).model.state_dict(), path)
    return path


def _campaign(t: Path) -> Path:
    """An existing campaign folder (what a previous 'run' left)."""
    run = t / "store" / "old"
    _write(run / "campaign.json", '{"model": "tiny_resnet", "reports": 2}')
    _write(run / "results" / "trial.json", '{"trial": 1}')
    return run


def _bank(t: Path) -> Path:
    """An existing bank (a header only) made for tiny_cnn."""
    from dfq_search.bank import BankHeader, SampleBank
    from dfq_search.fingerprint import model_fingerprint
    from dfq_search.models import create_model

    b = create_model("tiny_cnn")
    header = BankHeader(model_fingerprint(b.model), b.preprocess.shape, b.num_classes, b.name, "float16")
    SampleBank.create(str(t / "bank"), header)
    return t / "bank"


# ---- the corpus: name -> builder(tmp) -> Case --------------------------------------------------------


def _c_space_malformed(t):
    p = _space(t, raw="bits:\n  weight: {_default: [2, 4]\n  activation: [\n")
    return Case(_run(t, p), ("not valid YAML", "space.yaml"), [p])


def _c_space_not_mapping(t):
    p = _space(t, raw="- 1\n- 2\n")
    return Case(_run(t, p), ("search space", "list"), [p])


def _c_space_unknown_section(t):
    p = _space(t, _set("serach", {"trials": 3}))
    return Case(_run(t, p), ("serach", "did you mean 'search'"), [p])


def _c_space_unknown_key(t):
    p = _space(t, _set("search.trails", 3))
    return Case(_run(t, p), ("trails", "did you mean 'trials'"), [p])


def _c_space_unknown_ptq_key(t):
    p = _space(t, _set("method.ptq.modcapk", 1))
    return Case(_run(t, p), ("modcapk", "modcap_k"), [p])


def _c_space_unknown_budget_key(t):
    p = _space(t, _set("budget.max_size", 3))
    return Case(_run(t, p), ("max_size", "max_size_kib"), [p])


def _c_space_string_for_number(t):
    p = _space(t, _set("search.trials", "many"))
    return Case(_run(t, p), ("search.trials", "many"), [p])


def _c_space_negative_refine(t):
    p = _space(t, _set("search.refine_top", -1))
    return Case(_run(t, p), ("search.refine_top", "-1"), [p])


def _c_space_refine_iters_without_finalists(t):
    def edit(data: dict) -> None:
        _set("search.refine_top", 0)(data)
        _set("search.refine_iters", 300)(data)

    p = _space(t, edit)
    return Case(_run(t, p), ("refine_iters without finalists", "refine_top: 0", "set search.refine_top"), [p])


def _c_space_refine_iters_without_ptq(t):
    def edit(data: dict) -> None:
        _set("method.kind", "qat")(data)
        data["method"].pop("ptq")
        _set("method.qat", {"train.iterations": 1000})(data)
        _set("search.refine_top", 2)(data)
        _set("search.refine_iters", 300)(data)

    p = _space(t, edit)
    return Case(_run(t, p), ("no kind reconstructs", "qat", "drop refine_iters"), [p])


def _c_space_unknown_search_key(t):
    p = _space(t, _set("search.refine_seed", 2))
    return Case(_run(t, p), ("refine_seed", "refine_seeds"), [p])


def _c_space_bool_for_int(t):
    p = _space(t, _set("samples.calibration", True))
    return Case(_run(t, p), ("samples.calibration", "True"), [p])


def _c_space_list_for_mapping(t):
    p = _space(t, _set("budget", [3, 4]))
    return Case(_run(t, p), ("budget", "[3, 4]", "mapping"), [p])


def _c_space_list_for_ptq(t):
    p = _space(t, _set("method.ptq", ["iters", 5]))
    return Case(_run(t, p), ("method.ptq", "mapping"), [p])


def _c_space_bits_outside_set(t):
    p = _space(t, _set("bits.weight._default", [2, 7]))
    return Case(_run(t, p), ("bits.weight", "7"), [p])


def _c_space_lambda_order(t):
    bounds = {"sample_loss.lambda_l": {"low": 0.7, "high": 0.9}, "sample_loss.lambda_u": 0.6}
    p = _space(t, _set("method", {"kind": "qat", "qat": bounds}))
    return Case(_run(t, p), ("lambda_l", "lambda_u", "0.7"), [p])


def _c_space_knob_the_preset_ignores(t):  # was dropped silently for every preset but adadfq
    p = _space(t, _set("method", {"kind": "qat", "qat": {"preset": "gdfq", "sample_loss.lambda_l": 0.2}}))
    return Case(_run(t, p), ("method.qat.sample_loss.lambda_l", "'gdfq'", "every configuration"), [p])


def _c_space_knob_by_its_old_name(t):  # knobs are config paths since issue 15
    p = _space(t, _set("method.ptq", {"iters": 5}))
    return Case(_run(t, p), ("method.ptq.iters is now method.ptq.recon.iters", "rename iters"), [p])


def _c_space_knob_no_config_has(t):
    p = _space(t, _set("method.ptq", {"recon.itres": 5}))
    return Case(_run(t, p), ("itres", "did you mean 'iters'"), [p])


def _c_space_knobs_of_a_method_not_run(t):  # method.qat with kind ptq: no trial would read them
    p = _space(t, _set("method.qat", {"train.q_lr": 1e-3}))
    return Case(_run(t, p), ("method.qat knobs", "['ptq']", "train.q_lr"), [p])


def _c_space_samples_key_the_source_ignores(t):  # samples.direct with gaussian samples: ignored
    p = _space(t, _set("samples.direct", {"iterations": 50}))
    return Case(_run(t, p), ("samples.direct", "gaussian", "50"), [p])


def _c_space_cmaes(t):  # CMA-ES on categorical bits: used to run a random sampler instead
    p = _space(t, _set("search.sampler", "cmaes"))
    return Case(_run(t, p), ("search.sampler 'cmaes'", "categorical"), [p])


def _c_space_top1_without_val_data(t):  # used to score the label-free MSE instead
    p = _space(t, _set("objective.metric", "top1"))
    return Case(_run(t, p, "--name", "m"), ("top1 needs labelled", "--val-data"), [p],
                absent=[t / "store" / "m" / "campaign.json"])  # fmt: skip


def _c_space_label_free_metric_with_val_data(t):  # used to score top1 instead of the metric asked
    data = _folder(t, 2)
    argv = _run(t, "tiny_smoke", "--val-data", str(data), "--name", "m")  # tiny_smoke: metric kl
    return Case(argv, ("metric kl is label-free", "--val-data"), [data],
                absent=[t / "store" / "m" / "campaign.json"])  # fmt: skip


def _c_space_impossible_budget(t):
    p = _space(t, _set("budget", {"max_size_kib": 0.01}))
    return Case(_run(t, p), ("impossible budget", "max_size_kib: 0.01"), [p])


def _c_space_second_budget_impossible(t):
    p = _space(t, _set("budget", {"max_size_kib": 4, "max_mbops": 0.001}))
    return Case(_run(t, p), ("impossible budget", "budget.max_mbops: 0.001", "raise the budget"), [p])


def _c_space_budget_leaves_one_plan(t):  # every trial repaired to the uniform 2-bit plan, 24 times
    def edit(data: dict) -> None:
        _set("budget", {"uniform_weight_bits": 2})(data)
        _set("bits.activation._default", [4])(data)

    p = _space(t, edit)
    return Case(_run(t, p), ("leaves nothing to search", "uniform_weight_bits: 2", "raise the budget"), [p])


def _c_space_missing_layer(t):
    p = _space(t, _set("bits.weight.conv9", [4]))
    return Case(_run(t, p), ("conv9", "lacks"), [p])


def _c_space_modcap_too_large(t):
    p = _space(t, _set("method.ptq.modcap_k", [0, 40]))
    return Case(_run(t, p), ("modcap_k", "40"), [p])


def _c_space_bank_without_path(t):
    p = _space(t, _set("samples.source", "bank"))
    return Case(_run(t, p), ("samples.bank",), [p])


def _c_space_bad_num_classes(t):
    p = _space(t, _set("model.num_classes", True))
    return Case(_run(t, p), ("num_classes", "True"), [p])


def _c_space_missing(t):
    return Case(_run(t, t / "nope.yaml"), ("search space file not found", "nope.yaml"))


def _c_space_unknown_shipped(t):
    return Case(_run(t, "tiny_smok"), ("tiny_smok", "did you mean 'tiny_smoke'"))


def _c_run_trials_zero(t):
    return Case(_run(t, "tiny_smoke", "--trials", "0"), ("--trials", "0"))


def _c_run_concurrency_negative(t):
    return Case(_run(t, "tiny_smoke", "--concurrency", "-2"), ("--concurrency", "-2"))


def _c_run_time_budget_zero(t):
    return Case(_run(t, "tiny_smoke", "--time-budget", "0"), ("--time-budget", "0"))


def _c_run_num_cpus_zero(t):
    return Case(_run(t, "tiny_smoke", "--num-cpus", "0"), ("--num-cpus", "0"))


def _c_run_unknown_sampler(t):
    return Case(_run(t, "tiny_smoke", "--sampler", "tpee"), ("sampler", "tpee", "did you mean 'tpe'"))


def _c_run_cmaes_sampler(t):
    return Case(_run(t, "tiny_smoke", "--sampler", "cmaes"), ("--sampler 'cmaes'", "categorical"))


def _c_run_unknown_model(t):
    return Case(_run(t, "tiny_smoke", "--model", "tiny_resnett"), ("unknown model", "tiny_resnett"))


def _c_run_missing_weights(t):
    return Case(_run(t, "tiny_smoke", "--weights", str(t / "no.pt")), ("not found", "no.pt"))


def _c_run_weights_of_other_model(t):
    w = _state_dict(t, "tiny_cnn", "tiny_cnn.pt")
    return Case(_run(t, "tiny_smoke", "--weights", str(w)), ("do not match tiny_resnet", "tiny_cnn.pt"), [w])


def _c_run_preprocessing_contradicts_the_model(t):  # tiny_resnet's weights fix its 16x16 input
    return Case(_run(t, "tiny_smoke", "--input-size", "32"), ("contradicts tiny_resnet", "32", "16"))


def _c_eval_mean_without_std(t):  # one mean (grayscale) and the default 3-channel std
    return Case(["eval", "--model", "tv:resnet18", "--mean", "0.5"], ("--mean without --std", "0.5"))


def _c_eval_grayscale_for_an_rgb_model(t):
    argv = ["eval", "--model", "tv:resnet18", "--input-size", "64", "--mean", "0.5", "--std", "0.5"]
    return Case(argv, ("resnet18 failed on an input of shape (2, 1, 64, 64)", "3 channels"))


def _c_quantize_method_flag_with_rtn(t):  # --modcap-k would be ignored by round-to-nearest
    return Case(
        ["quantize", "--bits", "W4A4", "--modcap-k", "1", "--out", str(t / "q.pt")],
        ("--modcap-k with --method rtn", "1"),
        absent=[t / "q.pt"],
    )


def _c_quantize_calib_with_ptq(t):  # a data-free method calibrates on --samples
    return Case(
        ["quantize", "--method", "ptq", "--calib", "gaussian", "--bits", "W4A4", "--out", str(t / "q.pt")],
        ("--calib with --method ptq", "--samples real:DIR"),
        absent=[t / "q.pt"],
    )


def _c_quantize_finetune_without_length(t):
    return Case(
        ["quantize", "--method", "finetune", "--bits", "W4A4", "--out", str(t / "q.pt")],
        ("without --finetune-iters", "80,000"),
        absent=[t / "q.pt"],
    )


def _c_quantize_distill_setting_misspelt(t):
    return Case(
        [
            "quantize",
            "--method",
            "ptq+distill",
            "--bits",
            "W4A4",
            "--set",
            "distill.learning_rate=1e-4",
            "--out",
            str(t / "q.pt"),
        ],
        ("distill: unknown settings", "learning_rate", "temperature"),
        absent=[t / "q.pt"],
    )


def _c_quantize_unknown_samples(t):
    return Case(
        ["quantize", "--method", "ptq", "--samples", "banks:x", "--bits", "W4A4", "--out", str(t / "q.pt")],
        ("--samples", "banks:x", "bank:DIR"),
        absent=[t / "q.pt"],
    )


def _c_quantize_set_misspelt(t):
    return Case(
        [
            "quantize",
            "--method",
            "ptq",
            "--set",
            "ptq.recon.qdorp=0.5",
            "--bits",
            "W4A4",
            "--out",
            str(t / "q.pt"),
        ],
        ("qdorp", "did you mean 'qdrop'"),
        absent=[t / "q.pt"],
    )


def _c_eval_unknown_timm_model(t):
    return Case(["eval", "--model", "timm:resnet1"], ("unknown timm model", "resnet1", "resnet18"))


def _c_quantize_synthesis_for_a_model_without_batchnorm(t):  # SqueezeNet: no BN statistics to match
    model = ["--model", "tv:squeezenet1_1", "--input-size", "64"]
    argv = ["quantize", *model, "--method", "ptq", "--bits", "W8A8", "--out", str(t / "q.pt"), "--no-eval"]
    return Case(
        argv,
        ("no BatchNorm for direct samples", "no normalization layers", "--samples real:DIR"),
        absent=[t / "q.pt"],
    )


def _c_run_bad_address(t):
    argv = _run(t, "tiny_smoke", "--address", "not-a-host:99999")
    return Case(argv, ("bad Ray address", "not-a-host:99999", "1..65535"), absent=[t / "store"])


def _c_run_unknown_host(t):
    argv = _run(t, "tiny_smoke", "--address", "no-such-host.invalid:6379")
    return Case(
        argv, ("host 'no-such-host.invalid' not found", "no-such-host.invalid:6379"), absent=[t / "store"]
    )


def _c_run_nothing_at_address(t):
    argv = _run(t, "tiny_smoke", "--address", "127.0.0.1:1")
    return Case(argv, ("no Ray cluster answers", "127.0.0.1:1"), absent=[t / "store"])


def _c_run_num_classes_zero(t):
    return Case(_run(t, "tiny_smoke", "--num-classes", "0"), ("--num-classes", "0"), absent=[t / "store"])


def _c_run_name_escapes_storage(t):
    argv = _run(t, "tiny_smoke", "--name", "../escape")
    return Case(argv, ("bad campaign name", "../escape"), absent=[t / "store", t / "escape"])


def _c_run_val_data_more_classes(t):
    data = _folder(t, 3)
    argv = _run(t, "tiny_smoke", "--val-data", str(data), "--num-classes", "2", "--name", "v")
    return Case(
        argv, ("--val-data has more classes", "3"), [data], absent=[t / "store" / "v" / "campaign.json"]
    )


def _c_run_missing_test_data(t):
    return Case(
        _run(t, "tiny_smoke", "--test-data", str(t / "nowhere")), ("image folder not found", "nowhere")
    )


def _c_run_bad_device(t):
    return Case(_run(t, "tiny_smoke", "--device", "tpu"), ("device", "tpu"))


def _c_run_existing_campaign(t):
    run = _campaign(t)
    return Case(_run(t, "tiny_smoke", "--name", "old"), ("already exists", "old", "--resume"), [run])


def _c_run_storage_under_file(t):
    f = _write(t / "file.txt", "not a folder")
    argv = ["run", "--space", "tiny_smoke", "--storage", str(f / "sub")]
    return Case(argv, ("not writable", "file.txt"), [f])


def _c_run_storage_is_file(t):
    f = _write(t / "store", "a file, not a folder")
    return Case(_run(t, "tiny_smoke"), ("not writable", "store"), [f])


def _c_run_storage_unknown_scheme(t):
    argv = ["run", "--space", "tiny_smoke", "--storage", "nosuch://bucket/p", "--name", "n"]
    return Case(argv, ("storage URI not understood", "nosuch://bucket/p/n", "s3://bucket/prefix"))


def _c_run_resume_changes_trials(t):
    run = _write(t / "store" / "old" / "campaign.json", '{"search": {"trials": 3, "sampler": "tpe"}}')
    argv = _run(t, "tiny_smoke", "--name", "old", "--resume", "--trials", "9")
    return Case(argv, ("cannot change its settings", "search.trials: 3 -> 9", "--name NEW"), [run.parent])


def _c_run_resume_campaign_before_config_paths(t):  # its trials name knobs the trial no longer reads
    meta = '{"space_resolved": {"ptq": {"iters": {"name": "ptq.iters", "choices": [5]}}}}'
    run = _write(t / "store" / "old" / "campaign.json", meta)
    argv = _run(t, "tiny_smoke", "--name", "old", "--resume")
    return Case(argv, ("before search knobs became config paths", "--name NEW"), [run.parent])


def _c_report_uri_not_campaign(t):
    return Case(["report", f"file://{t}/nothing"], ("not a campaign folder", "nothing"))


def _c_report_not_campaign(t):
    d = t / "notrun"
    _write(d / "notes.txt", "hello")
    return Case(["report", str(d)], ("not a campaign folder", "notrun"), [d])


def _c_eval_plan_malformed(t):
    p = _write(t / "plan.yaml", "_default: {w: 4, a: 4\nconv1: [\n")
    return Case(["eval", "--plan", str(p)], ("bit plan is not valid YAML", "plan.yaml"), [p])


def _c_eval_plan_bits_outside(t):
    p = _write(t / "plan.yaml", "_default: {w: 7, a: 4}\n")
    return Case(["eval", "--plan", str(p)], ("not allowed", "7"), [p])


def _c_eval_plan_unknown_field(t):
    p = _write(t / "plan.yaml", "_default: {w: 4, b: 4}\n")
    return Case(["eval", "--plan", str(p)], ("unknown field", "'b'"), [p])


def _c_eval_plan_list(t):
    p = _write(t / "plan.yaml", "- w: 4\n")
    return Case(["eval", "--plan", str(p)], ("bit plan", "list"), [p])


def _c_eval_bits_outside(t):
    return Case(["eval", "--bits", "W7A4"], ("not allowed", "7"))


def _c_eval_missing_weights(t):
    return Case(["eval", "--weights", str(t / "none.pt")], ("not found", "none.pt"))


def _c_eval_weights_not_torch(t):
    w = _write(t / "garbage.pt", "this is not a checkpoint")
    return Case(["eval", "--weights", str(w)], ("not a loadable torch checkpoint", "garbage.pt"), [w])


def _c_eval_weights_directory(t):
    d = t / "wdir"
    d.mkdir()
    return Case(["eval", "--weights", str(d)], ("directory", "wdir"), [d])


def _c_eval_missing_data(t):
    return Case(["eval", "--data", str(t / "nowhere")], ("nowhere",))


def _c_eval_missing_checkpoint(t):
    return Case(["eval", "--checkpoint", str(t / "q.pt")], ("checkpoint not found", "q.pt"))


def _c_eval_checkpoint_and_bits(t):  # --bits used to be ignored beside a checkpoint
    argv = ["eval", "--model", "tiny_cnn", "--checkpoint", str(t / "q.pt"), "--bits", "W4A4"]
    return Case(argv, ("--checkpoint with --plan/--bits", "W4A4"))


def _c_eval_checkpoint_is_weights(t):
    w = _state_dict(t, "tiny_cnn", "plain.pt")
    argv = ["eval", "--model", "tiny_cnn", "--data", str(_folder(t, 2)), "--checkpoint", str(w)]
    return Case(argv, ("not a dfq_search checkpoint", "plain.pt"), [w])


def _c_eval_num_classes_vs_default(t):
    return Case(["eval", "--num-classes", "5"], ("10 classes", "5"))


def _c_eval_num_classes_vs_weights(t):
    w = _state_dict(t, "tiny_cnn", "tiny10.pt")
    argv = ["eval", "--model", "tiny_cnn", "--weights", str(w), "--num-classes", "4"]
    return Case(argv, ("do not match tiny_cnn", "tiny10.pt", "shape"), [w])


def _c_eval_num_classes_vs_data(t):
    data = _folder(t, 3)
    argv = ["eval", "--model", "tiny_cnn", "--num-classes", "2", "--data", str(data)]
    return Case(argv, ("more classes", "3"), [data])


def _c_eval_num_classes_zero(t):
    return Case(["eval", "--model", "tiny_cnn", "--num-classes", "0"], ("num_classes", "0"))


def _c_eval_mismatched_resnet(t):
    if (SHARED / "weights" / "resnet32-d509ac18.th").is_file():
        w = SHARED / "weights" / "resnet32-d509ac18.th"
    else:  # no reference data: a state dict of the deeper model, built here
        w = _state_dict(t, "cifar_resnet32", "resnet32.th")
    argv = ["eval", "--model", "cifar_resnet20", "--weights", str(w)]
    return Case(argv, ("do not match cifar_resnet20", "resnet32"), [w])  # the file is left as it was


def _c_eval_cuda_without_gpu(t):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    return Case(["eval", "--device", "cuda"], ("GPU", "cuda"))


def _c_eval_bad_device(t):
    return Case(["eval", "--device", "tpu"], ("device", "tpu"))


def _c_eval_unknown_model(t):
    return Case(["eval", "--model", "digit_cnn"], ("unknown model", "digit_cnn", "did you mean 'digits_cnn'"))


def _c_eval_unknown_user_module(t):
    return Case(["eval", "--model", "no_such_pkg_xyz.nets:build"], ("cannot import", "no_such_pkg_xyz.nets"))


def _c_eval_bad_user_form(t):
    return Case(["eval", "--model", "a:b:c"], ("bad user model name", "a:b:c"))


def _c_eval_batch_size_zero(t):
    return Case(["eval", "--batch-size", "0"], ("--batch-size", "0"))


def _c_eval_calib_images_zero(t):
    return Case(["eval", "--bits", "W4A4", "--calib-images", "0"], ("n_images", "0"))


def _c_eval_missing_calib(t):
    return Case(
        ["eval", "--bits", "W4A4", "--calib", str(t / "calibdir")], ("calibration source", "calibdir")
    )


def _c_eval_plan_unknown_layer_before_data(t):
    p = _write(t / "plan.yaml", "_default: {w: 4, a: 4}\nconv9: {w: 8, a: 8}\n")
    argv = ["eval", "--model", "tiny_cnn", "--plan", str(p), "--data", str(t / "nowhere")]
    return Case(argv, ("lacks", "conv9"), [p])  # the plan is refused before the data is looked at


def _c_quantize_out_under_file(t):
    f = _write(t / "file.txt", "x")
    argv = ["quantize", "--model", "tiny_cnn", "--bits", "W4A4", "--no-eval", "--out", str(f / "q.pt")]
    return Case(argv, ("--out cannot be written", "file.txt"), [f])


def _c_baseline_bad_bits_before_eval(t):
    return Case(["baseline", "--bits", "W8A8", "W9A9"], ("not allowed", "9"))


def _c_eval_unknown_protocol(t):
    return Case(["eval", "--bits", "W4A4", "--protocol", "ptqq"], ("protocol", "ptqq"))


def _c_baseline_bad_bits_form(t):
    return Case(["baseline", "--bits", "4bit"], ("WxAy", "4bit"))


def _c_generate_unknown_set_key(t):
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(t / "bank"), "--set", "train.iteratons=5"]
    return Case(argv, ("iteratons", "did you mean 'iterations'"), absent=[t / "bank"])


def _c_generate_set_wrong_type(t):
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(t / "bank"), "--set", "train.batch_size=big"]
    return Case(argv, ("train.batch_size", "big", "an int"), absent=[t / "bank"])


def _c_generate_samples_zero(t):
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(t / "bank"), "--samples", "0"]
    return Case(argv, ("--samples", "0"), absent=[t / "bank"])


def _c_generate_workers_negative(t):
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(t / "bank"), "--workers", "-1"]
    return Case(argv, ("--workers", "-1"), absent=[t / "bank"])


def _c_generate_shard_rows_zero(t):
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(t / "bank"), "--shard-rows", "0"]
    return Case(argv, ("--shard-rows", "0"), absent=[t / "bank"])


def _c_generate_bad_address(t):
    argv = [
        "generate",
        "--model",
        "tiny_cnn",
        "--bank",
        str(t / "bank"),
        "--workers",
        "2",
        "--address",
        "h:0",
    ]
    return Case(argv, ("bad Ray address", "h:0"), absent=[t / "bank"])


def _c_generate_bank_under_file(t):
    f = _write(t / "file.txt", "x")
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(f / "bank"), "--samples", "4"]
    return Case(argv, ("cannot create a sample bank", "file.txt"), [f])


def _c_generate_set_no_value(t):
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(t / "bank"), "--set", "train.batch_size"]
    return Case(argv, ("override", "train.batch_size", "key=value"))


def _c_generate_unknown_preset(t):
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(t / "bank"), "--preset", "gdfqq"]
    return Case(argv, ("unknown preset", "gdfqq"))


def _c_generate_bank_of_other_model(t):
    bank = _bank(t)
    argv = ["generate", "--model", "tiny_resnet", "--bank", str(bank), "--samples", "8"]
    return Case(argv, ("another model", "fingerprint"), [bank])


def _c_generate_bad_set_keeps_bank(t):
    bank = _bank(t)
    argv = ["generate", "--model", "tiny_cnn", "--bank", str(bank), "--set", "source.latent=5"]
    return Case(argv, ("latent", "latent_dim"), [bank])


def _c_bank_missing(t):
    return Case(["bank", "info", str(t / "nobank")], ("no sample bank", "nobank"))


def _c_bank_not_a_bank(t):
    d = t / "folder"
    _write(d / "x.txt", "x")
    return Case(["bank", "info", str(d)], ("no sample bank", "folder"), [d])


CASES = {name.removeprefix("_c_"): fn for name, fn in dict(globals()).items() if name.startswith("_c_")}


# ---- the checks ---------------------------------------------------------------------------------------


def _snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``paths``."""
    out: dict[str, bytes | None] = {}
    for root in paths:
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            out[str(p)] = None if p.is_dir() else p.read_bytes()
    return out


@pytest.fixture(scope="module", autouse=True)
def _warm(shared_cache):
    """The digits model's default weights (trained once per test session) and the lazy imports."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DFQ_SEARCH_CACHE", str(shared_cache))
    from dfq_search.models.digits import default_weights

    default_weights()
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _env(shared_cache, monkeypatch, tmp_path, one_thread):
    monkeypatch.setenv("DFQ_SEARCH_CACHE", str(shared_cache))
    monkeypatch.chdir(tmp_path)  # a stray default (e.g. ./runs) would land here


def test_the_corpus_is_large():
    assert len(CASES) >= 35


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_damages_nothing(name, tmp_path, capsys, patience):
    case = CASES[name](tmp_path)
    before = _snapshot(case.keep)
    capsys.readouterr()
    start = time.perf_counter()
    code = main(case.argv)
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (name, out, err)
    assert "Traceback" not in err + out
    assert len(lines) == 1 and lines[0].startswith("dfq-search: error:"), (name, err)
    assert "Fix:" in lines[0], lines[0]
    for needle in case.needles:
        assert needle in lines[0], (name, needle, lines[0])
    assert _snapshot(case.keep) == before, f"{name}: an existing file or folder changed"
    for path in case.absent:
        assert not path.exists(), f"{name}: {path} was written before the input was refused"
    store = tmp_path / "store"
    empty = [p.name for p in store.iterdir() if p.is_dir() and not any(p.iterdir())] if store.is_dir() else []
    assert not empty, f"{name}: left empty campaign folders {empty}"
    # refused before compute: seconds on a machine at load 4 (times the measured slowdown), never minutes
    assert seconds < patience(5), f"{name} took {seconds:.1f} s: validation must come before compute"
    ray = __import__("sys").modules.get("ray")
    assert ray is None or not ray.is_initialized(), f"{name} started Ray"
