"""A search campaign from start to end (the flow of ../DESIGN.md, as what ``dfq-search run`` does):

1. load P and the space; check the storage path before any compute;
2. synthesize (or read from the cache or a bank) the calibration and held-out samples;
3. ZeroQ sensitivity (weights; activations where they are searched) on the calibration samples:
   the budget repair's order, the DP and ILP warm starts;
4. warm starts: the uniform plans that fit the budget and the sensitivity-DP plan, run first;
5. the runner (Ray Tune + OptunaSearch: dfq_search.distributed.runner) runs the trials;
6. results.parquet, the Pareto front (table + PNG), best_plan.yaml, the best model (checkpoint and,
   with the onnx extra, ONNX), TensorBoard curves; candidates scored on the test images when given.

A campaign lives in ``<storage>/<name>``; ``resume`` continues it without rerunning finished trials.
Ray stays behind the :class:`~dfq_search.search.runner.Runner` the caller hands in: nothing here imports
Ray or ``dfq_search.distributed``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dfq_search.errors import DfqError
from dfq_search.models import ModelBundle, create_model
from dfq_search.models.preprocessing import given, recorded
from dfq_search.quant import LayerBits, trace_layers
from dfq_search.search.define import PlanSpace, SpaceFunction
from dfq_search.search.objective import DEFAULT_LABEL_FREE, LABEL_FREE, FidelityScorer, LabelledScorer
from dfq_search.search.outputs import CampaignResult, finalize, score_on_test
from dfq_search.search.results import result_rows
from dfq_search.search.resume import check_resumed
from dfq_search.search.runner import Runner, TrialsSpec, print_line
from dfq_search.search.samples import CampaignSamples, campaign_samples
from dfq_search.search.space import Resources, Search, SearchSpace
from dfq_search.search.starts import (
    SENSITIVITY_IMAGES,
    act_sensitivity,
    dp_plan,
    hessian_sensitivity,
    sensitivity,
    warm_start_points,
    warm_starts,
)
from dfq_search.search.storage import CampaignStore
from dfq_search.search.trial import TrialContext
from dfq_search.synth.bn import require_bn_for_samples

__all__ = [
    "CampaignOptions",
    "CampaignResult",
    "Prepared",
    "check_storage",
    "dp_plan",
    "finalize",
    "prepare",
    "run_campaign",
    "score_on_test",
    "warm_starts",
]

Log = Callable[[str], None]
MIN_FREE_BYTES = 200 * 2**20


@dataclass
class CampaignOptions:
    """What the user chose on top of the space file (the CLI's flags)."""

    space: SearchSpace
    model: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    storage: Path | str = Path("runs")  # a folder, or a URI (s3://bucket/prefix)
    name: str | None = None
    address: str | None = None
    resume: bool = False
    time_budget: float | None = None
    trials: int | None = None
    concurrency: int | None = None
    sampler: str | None = None
    val_data: Path | None = None
    test_data: Path | None = None
    device: str = "cpu"
    num_cpus: int | None = None
    val_images: Any = None  # an ImageData instead of val_data (e.g. half of a test set, in a benchmark)
    test_images: Any = None  # an ImageData instead of test_data

    @property
    def model_name(self) -> str:
        name = self.model or self.space.model.name
        if not name:
            raise DfqError("no model", None, "--model NAME or model.name in the space", "pass --model")
        return name

    @property
    def run_name(self) -> str:
        """``--name``, else ``<model>-<space>-<hash>``: the hash of everything that defines the campaign,
        so rerunning the same command finds (and resumes) the same campaign, and a changed one is new."""
        if self.name:
            return self.name
        from dfq_search.fingerprint import config_hash

        key = {"space": self.space, "model": self.model_name, "weights": self.weights,
               "num_classes": self.num_classes, "trials": self.trials, "sampler": self.sampler,
               "val": str(self.val_data), "concurrency": self.concurrency}  # fmt: skip
        model = self.model_name.replace(":", "_").replace(".", "_")
        return f"{model}-{Path(self.space.source).stem}-{config_hash(key)[:8]}"


def check_storage(run_dir: Path, resume: bool) -> None:
    """Refuse, before any compute, a storage path that cannot be written, a full disk, or an existing
    campaign that was not asked to be resumed (nothing of it is touched)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise DfqError(
            "storage path is not writable",
            str(run_dir),
            f"a writable folder ({err.strerror})",
            "pass --storage DIR where you can write",
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < MIN_FREE_BYTES:
        raise DfqError(
            "not enough free disk space at the storage path",
            f"{free / 2**20:.0f} MiB",
            f"at least {MIN_FREE_BYTES // 2**20} MiB",
            "free space or pass another --storage",
        )
    if (run_dir / "campaign.json").exists() and not resume:
        raise _exists(str(run_dir))


def _exists(where: str) -> DfqError:
    return DfqError(
        "a campaign already exists at the storage path",
        where,
        "a new --name, or --resume to continue this one",
        "add --resume or pass --name NEW",
    )


def _open_store(opts: CampaignOptions, log: Log) -> tuple[CampaignStore, bool]:
    """The campaign's store, checked, and whether to resume (the same unnamed campaign resumes)."""
    store = CampaignStore.at(opts.storage, opts.run_name)
    if store.uri is None:
        check_storage(store.local.parent, True)
    else:
        store.check_remote()
    exists = store.exists()
    resume = opts.resume or (opts.name is None and exists)
    if resume and not opts.resume:
        log(f"the same campaign exists in {store.where}: resuming it (finished trials are kept; --name NEW "
            "starts another)")  # fmt: skip
    if store.uri is not None:
        if exists and not resume:
            raise _exists(store.where)
        if resume:
            store.pull()
        else:
            store.reset()
    return store, resume


def _test_data(opts: CampaignOptions, bundle: ModelBundle):
    """Images the campaign reports on but never optimises on (digits_cnn: its held-out split)."""
    if opts.test_images is not None:
        return opts.test_images
    if opts.test_data is not None:
        from dfq_search.data.folder import load_image_folder

        return load_image_folder(opts.test_data, bundle.preprocess)
    if bundle.name == "digits_cnn":
        from dfq_search.data.digits import load_digits_split

        return load_digits_split("test")
    return None


def _check_modcap(space: SearchSpace, bundle: ModelBundle, example: torch.Tensor) -> None:
    knob = space.ptq.get("modcap_k")
    if knob is None or not any("ptq" in k for k in space.kind.values()) or max(knob.values()) == 0:
        return
    from dfq_search.ptq.modcap import check_k
    from dfq_search.ptq.units import find_units

    units = find_units(bundle.model, example)
    try:
        check_k(units, int(max(knob.values())))
    except DfqError as err:
        raise DfqError(
            f"method.ptq.modcap_k too large for {bundle.name}",
            list(knob.values()),
            err.allowed,
            "lower the largest modcap_k choice in the space file",
        ) from None


def _label_free(space: SearchSpace, run_dir: Path, resume: bool) -> str:
    """The label-free metric: the space's; for ``auto``, the one a resumed campaign started with (a
    campaign never changes its objective midway), else ``DEFAULT_LABEL_FREE``."""
    if space.objective.metric in LABEL_FREE:
        return space.objective.metric
    meta = run_dir / "campaign.json"
    if resume and meta.is_file():
        started = json.loads(meta.read_text()).get("objective")
        if started in LABEL_FREE:
            return started
    return DEFAULT_LABEL_FREE


def _check_metric(metric: str, labelled: bool) -> None:
    """Refuse an objective the data cannot give: top1 without labelled images, or a label-free metric
    beside labelled images (they would score top1 instead)."""
    if metric == "top1" and not labelled:
        raise DfqError("objective.metric top1 needs labelled validation images", metric,
                       f"top1 with --val-data, or a label-free metric ({', '.join(LABEL_FREE)}) or auto",
                       "pass --val-data DIR, or set objective.metric: auto")  # fmt: skip
    if metric in LABEL_FREE and labelled:
        raise DfqError(f"objective.metric {metric} is label-free, and --val-data was given", metric,
                       "top1 or auto with --val-data (scored on it); a label-free metric without it",
                       "set objective.metric: auto (top1 on --val-data), or drop --val-data")  # fmt: skip


def _sample_grid(folder: Path, bundle: ModelBundle, calib: torch.Tensor, heldout: torch.Tensor) -> None:
    """The campaign's synthetic samples as TensorBoard image grids (calibration and held-out)."""
    from dfq_search.qat.reporter import TensorBoardReporter

    board = TensorBoardReporter(str(folder), bundle.preprocess.mean, bundle.preprocess.std)
    board.images(0, "samples/calibration", calib[:64])
    board.images(0, "samples/heldout", heldout[:64])
    board.close()


@dataclass
class Prepared:
    bundle: ModelBundle
    plans: PlanSpace
    ctx: TrialContext
    starts: dict[str, dict[str, LayerBits]]
    test_data: Any
    meta: dict[str, Any]


def prepare(
    opts: CampaignOptions, run_dir: Path, runner: Runner, log: Log = print_line, bank: str | None = None
) -> Prepared:
    """Everything before the trials (steps 1-4 of the module docstring); ``bank``: where generator
    samples spill (a path or URI every node reaches; default ``run_dir/bank``)."""
    from dfq_search.device import resolve_device

    space, device = opts.space, resolve_device(opts.device)
    bundle = create_model(
        opts.model_name,
        opts.weights or (opts.space.model.weights if not opts.model else None),
        opts.num_classes or space.model.num_classes,
        device,
        **given(
            asdict(space.model)
        ),  # the space's preprocessing, with the command's flags (with_model_flags)
    )
    require_bn_for_samples(bundle.model, bundle.name, space.samples.source)
    example = bundle.preprocess.example_input(device=device)
    layers = trace_layers(bundle.model, example)
    PlanSpace(space, layers)  # refuses rules naming missing layers or an impossible budget, before compute
    _check_modcap(space, bundle, example)
    val = opts.val_images
    if opts.val_data is not None:
        from dfq_search.data.folder import load_image_folder

        val = load_image_folder(opts.val_data, bundle.preprocess)
    test = _test_data(opts, bundle)
    for flag, data in (("--val-data", val), ("--test-data", test)):
        if data is not None and len(data.classes) > bundle.num_classes:
            raise DfqError(
                f"{flag} has more classes than {bundle.name} outputs", len(data.classes),
                f"at most {bundle.num_classes} class folders", f"pass the right {flag} or --num-classes",
            )  # fmt: skip
    _check_metric(space.objective.metric, val is not None)
    draw = None
    if space.samples.source == "generator":
        runner.start(opts.address, opts.num_cpus)  # the generator workers
        bank, name = bank or str(run_dir / "bank"), f"{run_dir.name}-samples"
        draw, heldout, seconds, origin = runner.generator_samples(
            bundle, space.samples, bank, name, space.resources, log
        )
        samples = CampaignSamples(None, heldout, seconds, origin)
        calib = draw(min(space.samples.calibration, SENSITIVITY_IMAGES))
    else:
        samples = campaign_samples(bundle, space.samples, device, log)
        calib = samples.calib
    n_held = len(samples.heldout)
    log(f"samples: {space.samples.calibration} calibration + {n_held} held-out ({samples.origin})")
    _sample_grid(run_dir / "tensorboard" / "samples", bundle, calib, samples.heldout)
    sens = sensitivity(bundle, calib, space, layers, run_dir, device, log)
    sens_a = act_sensitivity(bundle, calib, space, layers, run_dir, device, log)
    plans = PlanSpace(space, layers, sens, sens_a)
    if val is not None:
        scorer = LabelledScorer(bundle.model, val, bundle.preprocess)
    else:
        scorer = FidelityScorer(bundle.model, samples.heldout, _label_free(space, run_dir, opts.resume))
    ctx = TrialContext(
        bundle.model.cpu(),
        bundle.name,
        bundle.num_classes,
        bundle.preprocess.shape,
        samples.calib,
        scorer,
        space.objective.reports,
        space.objective.eval_fraction,
        draw=draw,
        calibration=space.samples.calibration,
        preprocess=bundle.preprocess,
        memo=str(run_dir / "memo"),
        heldout=samples.heldout,
        units=str(run_dir / "units"),
    )
    hessian = None
    if "hessian" in space.search.warm_start:
        hessian = hessian_sensitivity(bundle, calib, plans, run_dir, device, log)
    starts = warm_starts(plans, space.search.warm_start, hessian)
    meta = {
        "model": bundle.name,
        "preprocess": recorded(bundle.preprocess),
        "space": space.source,
        "objective": scorer.metric,
        "samples": samples.origin,
        "synthesis_s": samples.seconds,
        "budget": asdict(space.budget),
        "uniform_limit_kib": plans.uniform_limit,
        "limits": {kind: {"cost": key, "limit": v} for kind, (key, v) in plans.limits.items()},
        "warm_starts": {k: {n: asdict(b) for n, b in v.items()} for k, v in starts.items()},
        "test_data": None if test is None else _test_name(opts),
    }
    return Prepared(bundle, plans, ctx, starts, test, meta)


def _test_name(opts: CampaignOptions) -> str:
    """What the test images are, for the summary: a folder, images handed over in memory (a benchmark's
    held-out half), or the embedded default's digits test split."""
    if opts.test_data:
        return str(opts.test_data)
    return "the test images given to the campaign" if opts.test_images is not None else "digits test split"


def run_campaign(opts: CampaignOptions, log: Log = print_line, *, runner: Runner) -> CampaignResult:
    """Run (or resume) a campaign on ``runner`` and write its outputs; see the module docstring."""
    start = time.perf_counter()
    store, resume = _open_store(opts, log)
    opts, run_dir = replace(opts, resume=resume), store.local
    fresh = not run_dir.exists()
    check_storage(run_dir, opts.resume)
    if opts.resume:
        check_resumed(run_dir / "campaign.json", opts.space, _search_of(opts))
    try:
        prep = prepare(opts, run_dir, runner, log, store.location("bank"))
    except DfqError:
        if fresh and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a mistake in the command leaves no empty campaign folder behind
        raise
    s, search = opts.space, _search_of(opts)
    meta = {**prep.meta, "search": asdict(search), "reports": s.objective.reports}
    (run_dir / "campaign.json").write_text(json.dumps({**meta, "space_resolved": asdict(s)}, indent=1))
    store.push()  # a campaign elsewhere than this machine can be resumed or reported from now on
    prep.ctx.p = prep.ctx.p.cpu()
    runner.start(opts.address, opts.num_cpus)
    spec = TrialsSpec(
        space_fn=SpaceFunction(prep.plans, seed=s.samples.seed),
        points=warm_start_points(prep.plans, prep.starts),
        ctx=prep.ctx,
        trials=search.trials,
        sampler=search.sampler,
        seed=search.seed,
        concurrency=search.concurrency,
        mode=s.objective.mode,
        reports=s.objective.reports,
        trial_cpu=s.resources.trial_cpu,
        trial_gpu=s.resources.trial_gpu,
        max_failures=search.max_failures,
        time_budget_s=opts.time_budget,
        explicit_gpu=opts.address is not None,
        log=log,
        curves=run_dir / "tensorboard",
    )
    log(
        f"campaign {store.where}: {search.trials} trials, {search.concurrency} at a time, "
        f"{search.sampler} sampler, objective {prep.ctx.scorer.metric} ({s.objective.mode})"
    )
    rss_before = _rss_mb()
    runner.run_trials(spec, store.tune_storage, opts.run_name, opts.resume)
    store.pull()  # the trials, when they were written to a URI
    memory = {"before_trials_mb": rss_before, "after_trials_mb": _rss_mb(), "peak_mb": _peak_rss_mb()}
    left = None if opts.time_budget is None else opts.time_budget - (time.perf_counter() - start)
    _refine(run_dir, prep, runner, search, opts.space.resources, left, log)
    store.push()
    result = finalize(run_dir, prep, runner.records(run_dir), log, {"driver_memory": memory}, store.fetch)
    store.push()
    if store.uri is not None:
        log(f"campaign stored at {store.uri} (local copy: {run_dir})")
    log(f"done in {time.perf_counter() - start:.1f} s")
    return result


def _search_of(opts: CampaignOptions) -> Search:
    """The space's search settings with the command line's on top."""
    flags = {"trials": opts.trials, "concurrency": opts.concurrency, "sampler": opts.sampler}
    return replace(opts.space.search, **{k: v for k, v in flags.items() if v is not None})


def _refine(
    run_dir: Path,
    prep: Prepared,
    runner: Runner,
    search: Search,
    res: Resources,
    left: float | None,
    log: Log,
) -> None:
    """Re-run the best plans with other seeds (:mod:`dfq_search.search.refine`), time allowing."""
    from dfq_search.search.outputs import mark_rows
    from dfq_search.search.refine import finalists, refine

    if search.refine_top < 1:
        return
    records = runner.records(run_dir)
    rows = result_rows(records, prep.ctx.reports)
    configs = {r.trial: r.config for r in records}

    def run(configs: list, done: Callable) -> None:
        runner.rerun(configs, prep.ctx, res.trial_cpu, res.trial_gpu, done)

    targets = {
        r["trial"]: r for r in [*finalists(rows, search.refine_top), *mark_rows(rows, prep.starts).values()]
    }
    refine(run_dir, list(targets.values()), configs, search.refine_seeds, run, log, left, search.concurrency,
           search.refine_iters)  # fmt: skip


def _rss_mb() -> float:
    import psutil  # a dependency of Ray

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
