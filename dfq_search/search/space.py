"""Search-space files (``search_spaces/*.yaml``): typed, strictly validated, with close-match hints.

A file has these sections (every one optional but ``bits``; see ``search_spaces/cifar_resnet20.yaml``
for all the keys with comments):

    model:     the model the space is written for (the CLI's --model/--weights override it)
    bits:      per-layer choices: weight: {rule: [bits...]}, activation: {rule: [bits...]}; a rule is a
               layer name, 're:<pattern>', '_first_last' (the layers reading the image and the last
               one) or '_default'
    budget:    any of uniform_weight_bits, uniform_bops, mean_weight_bits, max_size_kib, max_mbops (a
               plan fits all of them); repair (lower bits until it fits)
    method:    kind (ptq, qat, ptq+qat, ptq+distill), ptq: {path of PTQConfig: knob}, qat: {preset,
               path of the game's config: knob}, distill: {field of DistillConfig: knob}
               (dfq_search.search.method)
    samples:   where calibration and held-out samples come from
    objective: mode (accuracy | pareto), metric (auto | top1 | agreement | kl | mse), reports
    search:    trials, sampler, seed, concurrency, warm_start, max_failures, refine_top, refine_seeds,
               refine_iters
    resources: trial_cpu, trial_gpu, worker_cpu, worker_gpu

Every knob of ``method`` is fixed, a list of choices, or a {low, high} range (:mod:`.knobs`), named by
its path in the config that owns it (:mod:`.method`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from dfq_search.errors import DfqError, refuse_unknown_keys, unknown_name
from dfq_search.models.preprocessing import KEYS as PREPROCESSING
from dfq_search.quant.quantizers import ALLOWED_BITS
from dfq_search.search.knobs import Knob, number, one_of, parse_knob
from dfq_search.search.method import DEFAULT_PRESET, parse_method
from dfq_search.synth.direct import DirectConfig

SECTIONS = ("model", "bits", "budget", "method", "samples", "objective", "search", "resources")
SAMPLERS = ("tpe", "random", "nsga2", "qmc", "gp")
# Samplers refused with the reason (Optuna has them, but not for this search).
UNFIT_SAMPLERS = {
    "cmaes": "CMA-ES samples only numeric parameters, and every bit width of a plan is categorical: Optuna "
    "would draw them with an independent random sampler, so the search would be random search",
}
SOURCES = ("direct", "gaussian", "bank", "generator")
METRICS = ("auto", "top1", "agreement", "kl", "mse")
WARM_STARTS = ("uniform", "sensitivity", "hessian")
BUDGETS = ("uniform_weight_bits", "uniform_bops", "mean_weight_bits", "max_size_kib", "max_mbops")
SPACE_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


def check_sampler(name: Any, where: str) -> str:
    """``name`` if it is a sampler of the search; one Optuna has but unfit here is refused with why."""
    if name in UNFIT_SAMPLERS:
        raise DfqError(f"{where} {name!r} cannot search this space", name, UNFIT_SAMPLERS[name],
                       f"set {where} to one of {', '.join(SAMPLERS)} (tpe models categorical "
                       "choices)")  # fmt: skip
    if name not in SAMPLERS:
        raise unknown_name("sampler", str(name), SAMPLERS, f"set {where} to one of them")
    return name


def _section(data: Mapping, name: str, allowed: tuple[str, ...] | list[str]) -> dict:
    value = data.get(name) or {}
    if not isinstance(value, Mapping):
        raise DfqError(f"search space section {name!r}", value, "a mapping of keys to values", "fix the YAML")
    refuse_unknown_keys(f"search space {name!r}", value, allowed)
    return dict(value)


def _bits_rules(raw: Any, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(raw, Mapping) or not raw:
        raise DfqError(
            where,
            raw,
            "a mapping of rules (layer, 're:...', _first_last, _default) to bit lists",
            "e.g. {_default: [2, 3, 4], _first_last: [8]}",
        )
    check = one_of(f"{where} bits", ALLOWED_BITS)
    return {str(k): parse_knob(f"{where}[{k}]", v, check).choices for k, v in raw.items()}


@dataclass(frozen=True)
class ModelRef:
    """The model a space is written for, and its preprocessing (None: the model's own; see
    :mod:`dfq_search.models.preprocessing`). ``--model`` replaces all of it but what flags give."""

    name: str | None = None
    weights: str | None = None
    num_classes: int | None = None
    input_size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def with_model_flags(space: SearchSpace, model: str | None, flags: Mapping[str, Any]) -> SearchSpace:
    """``space`` whose model section says what the command's flags do: ``--model`` drops the section's
    preprocessing (it was written for another model), the preprocessing flags replace its keys."""
    keep = {} if model is None else {k: None for k in PREPROCESSING}
    return replace(
        space, model=replace(space.model, **{**keep, **{k: v for k, v in flags.items() if v is not None}})
    )


def _floats(where: str) -> Callable[[Any], tuple[float, ...]]:
    def check(value: Any) -> tuple[float, ...]:
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise DfqError(
                where,
                value,
                "a list of numbers, one per input channel",
                "e.g. [0.5] or [0.485, 0.456, 0.406]",
            )
        return tuple(float(v) for v in values)

    return check


@dataclass(frozen=True)
class Budget:
    """Any of these limits (a plan must fit every one given, e.g. a size and a BOPs limit together);
    ``repair`` lowers a sampled plan's bits until it fits (else it is refused).

    uniform_weight_bits: the weight size of the uniform plan at these bits (every layer at its choice
        nearest to them, e.g. pinned first/last layers at 8): "as small as uniform 3-bit".
    mean_weight_bits: weight bits per parameter of the quantized layers.
    max_size_kib: weight size in KiB; max_mbops: millions of bit operations (MACs x w bits x a bits).
    """

    uniform_weight_bits: int | None = None
    uniform_bops: str | None = None
    mean_weight_bits: float | None = None
    max_size_kib: float | None = None
    max_mbops: float | None = None
    repair: bool = True

    @property
    def kinds(self) -> tuple[str, ...]:
        """The limits given, in the order of ``BUDGETS`` (empty: no budget)."""
        return tuple(k for k in BUDGETS if getattr(self, k) is not None)


@dataclass(frozen=True)
class Samples:
    """Where a campaign's samples come from.

    direct: ZeroQ/DSG-style image optimisation in the driver (``direct``: settings of
    :class:`~dfq_search.synth.direct.DirectConfig` by name, e.g. ``{iterations: 200, bn_relative: true}``);
    gaussian: noise; bank: a Parquet bank made by 'dfq-search generate' (``bank``: its path);
    generator: generator workers (Ray actors, one per entry of ``generators``, a game preset each)
    train against P for ``generator_steps`` steps, dropping their first ``keep_after`` steps'
    samples, into a shared buffer of ``buffer_shards`` actors (spread over the cluster's nodes) that
    writes them through to ``<campaign>/bank``; trials draw ``calibration`` samples from the buffer;
    the held-out set is drawn fresh from the final generators, never buffered.
    """

    source: str = "direct"
    bank: str | None = None
    calibration: int = 256
    heldout: int = 256
    direct: DirectConfig = field(default_factory=DirectConfig)
    seed: int = 0
    generators: tuple[str, ...] = ("gdfq",)
    generator_steps: int = 300
    keep_after: int = 100
    buffer_shards: int = 1  # one per node spreads the serving; a lost node then costs one shard


@dataclass(frozen=True)
class Objective:
    mode: str = "accuracy"  # accuracy under the budget (ASHA), or pareto (accuracy vs size)
    metric: str = "auto"  # auto: top1 with labelled validation data, else mse (objective.DEFAULT_LABEL_FREE)
    reports: int = 3  # reports per trial (ASHA's rungs)
    eval_fraction: float = 0.5  # part of the held-out set scored during trials; all of it at the end


@dataclass(frozen=True)
class Search:
    trials: int = 12
    sampler: str = "tpe"
    seed: int = 0
    concurrency: int = 2
    warm_start: tuple[str, ...] = ("uniform", "sensitivity")
    max_failures: int = 1  # retries of a trial that raised
    refine_top: int = 0  # the best plans re-run with other reconstruction seeds at the end (0: none)
    refine_seeds: int = 2  # reruns of each of them (dfq_search.search.refine)
    refine_iters: int | None = None  # reconstruction steps per unit of the reruns (None: the trial's)


@dataclass(frozen=True)
class Resources:
    trial_cpu: float = 1.0
    trial_gpu: float = 0.0
    worker_cpu: float = 1.0  # per generator worker (samples.source: generator)
    worker_gpu: float = 0.25


@dataclass(frozen=True)
class SearchSpace:
    weight_bits: dict[str, tuple[int, ...]]
    act_bits: dict[str, tuple[int, ...]]
    model: ModelRef = ModelRef()
    budget: Budget = Budget()
    kind: Knob = field(default_factory=lambda: Knob("kind", ("ptq",)))
    ptq: dict[str, Knob] = field(default_factory=dict)  # path of PTQConfig -> knob
    qat: dict[str, Knob] = field(default_factory=lambda: {"preset": Knob("qat.preset", (DEFAULT_PRESET,))})
    samples: Samples = Samples()
    objective: Objective = Objective()
    search: Search = Search()
    resources: Resources = Resources()
    source: str = "<dict>"
    distill: dict[str, Knob] = field(default_factory=dict)  # field of DistillConfig -> knob

    def knobs(self) -> list[Knob]:
        """The method knobs a trial suggests, in a fixed order (PTQ's only when a kind uses PTQ...)."""
        kinds = self.kind.values()
        out = [self.kind]
        out += list(self.ptq.values()) if any("ptq" in k for k in kinds) else []
        out += list(self.qat.values()) if any("qat" in k for k in kinds) else []
        out += list(self.distill.values()) if any("distill" in k for k in kinds) else []
        return out


def _typed(cls: type, section: dict, name: str, checks: Mapping[str, Any]) -> Any:
    for key, check in checks.items():
        if key in section:
            section[key] = check(section[key])
    try:
        return cls(**section)
    except TypeError as err:
        raise DfqError(f"search space {name!r}", section, str(err), "fix the section") from None


def _presets(value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    from dfq_search.qat.config import GENERATOR_PRESETS

    check = one_of("samples.generators", GENERATOR_PRESETS)
    return tuple(check(v) for v in values)


def _uniform_bits(text: Any) -> str:
    from dfq_search.quant.plan import parse_bits

    if not isinstance(text, str):
        raise DfqError("budget.uniform_bops", text, "a uniform plan written WxAy", "e.g. uniform_bops: W3A3")
    parse_bits(text)
    return text.upper()


def _budget(section: dict) -> Budget:
    checks = {k: number(f"budget.{k}", 1e-9, 1e12) for k in BUDGETS}
    checks["uniform_weight_bits"] = one_of("budget.uniform_weight_bits", ALLOWED_BITS)
    checks["uniform_bops"] = _uniform_bits
    checks["repair"] = one_of("budget.repair", (True, False))
    return _typed(Budget, section, "budget", checks)


# keys of samples and resources that only some sample sources read
READ_BY = {
    "samples": {"bank": "bank", "direct": "direct", "generators": "generator",
                "generator_steps": "generator", "keep_after": "generator", "buffer_shards": "generator"},
    "resources": {"worker_cpu": "generator", "worker_gpu": "generator"},
}  # fmt: skip


def _direct(value: Any) -> DirectConfig:
    if not isinstance(value, Mapping):
        raise DfqError("samples.direct", value, "a mapping of direct-synthesis settings",
                       "e.g. direct: {iterations: 200, bn_relative: true}")  # fmt: skip
    return DirectConfig.from_dict(value, "samples.direct")


def _samples(data: Mapping) -> Samples:
    raw = data.get("samples") or {}
    if isinstance(raw, Mapping) and "iterations" in raw:  # before issue 15: a copy of DirectConfig's
        raise DfqError("samples.iterations is now samples.direct.iterations", raw["iterations"],
                       "samples: {direct: {iterations: N}} (any DirectConfig setting by name)",
                       f"write direct: {{iterations: {raw['iterations']}}} under samples")  # fmt: skip
    samples = _typed(
        Samples,
        _section(data, "samples", Samples.__dataclass_fields__),
        "samples",
        {
            "source": one_of("samples.source", SOURCES),
            "calibration": number("samples.calibration", 1, 10**6, integer=True),
            "heldout": number("samples.heldout", 2, 10**6, integer=True),
            "direct": _direct,
            "generators": _presets,
            "generator_steps": number("samples.generator_steps", 1, 10**7, integer=True),
            "keep_after": number("samples.keep_after", 0, 10**7, integer=True),
            "buffer_shards": number("samples.buffer_shards", 1, 1024, integer=True),
            "seed": number("samples.seed", 0, 2**31, integer=True),
        },
    )
    if samples.source == "bank" and not samples.bank:
        raise DfqError("samples.bank", None, "a bank URI when source is 'bank'", "add samples.bank: <path>")
    _refuse_unread(data, samples.source)
    return samples


def _refuse_unread(data: Mapping, source: str) -> None:
    """Refuse a key given for a sample source other than the campaign's (it would be ignored)."""
    for section, keys in READ_BY.items():
        for key, reader in keys.items():
            if key in (data.get(section) or {}) and reader != source:
                raise DfqError(f"{section}.{key} with samples.source {source}", data[section][key],
                               f"{key} only with samples.source: {reader} ({source} would ignore it)",
                               f"drop {section}.{key}, or set samples.source: {reader}")  # fmt: skip


def parse_space(data: Any, source: str = "<dict>") -> SearchSpace:
    """A validated :class:`SearchSpace` from the YAML mapping ``data``."""
    if not isinstance(data, Mapping):
        raise DfqError(
            "search space", type(data).__name__, "a YAML mapping of sections", "see search_spaces/"
        )
    refuse_unknown_keys("search space section", data, SECTIONS)
    bits = _section(data, "bits", ("weight", "activation"))
    if "weight" not in bits or "activation" not in bits:
        raise DfqError(
            "search space bits",
            bits,
            "both weight and activation rules",
            "add bits: {weight: {_default: [2, 3, 4]}, activation: {_default: [4]}}",
        )
    model = _section(data, "model", ModelRef.__dataclass_fields__)
    method = _section(data, "method", ("kind", "ptq", "qat", "distill"))
    kind, ptq, qat, distill = parse_method(method)
    samples = _samples(data)
    objective = _typed(
        Objective,
        _section(data, "objective", Objective.__dataclass_fields__),
        "objective",
        {
            "mode": one_of("objective.mode", ("accuracy", "pareto")),
            "metric": one_of("objective.metric", METRICS),
            "reports": number("objective.reports", 1, 100, integer=True),
            "eval_fraction": number("objective.eval_fraction", 0.01, 1.0),
        },
    )
    search = _section(data, "search", Search.__dataclass_fields__)
    if search.get("sampler") is not None:
        check_sampler(search["sampler"], "search.sampler")
    warm = search.get("warm_start", Search.warm_start)
    for w in warm if isinstance(warm, list | tuple) else [warm]:
        if w not in WARM_STARTS:
            raise unknown_name("warm start", str(w), WARM_STARTS, "set search.warm_start to a list of them")
    search["warm_start"] = tuple(warm if isinstance(warm, list | tuple) else [warm])
    search = _typed(
        Search,
        search,
        "search",
        {
            "trials": number("search.trials", 1, 10**6, integer=True),
            "seed": number("search.seed", 0, 2**31, integer=True),
            "concurrency": number("search.concurrency", 1, 4096, integer=True),
            "max_failures": number("search.max_failures", 0, 100, integer=True),
            "refine_top": number("search.refine_top", 0, 1000, integer=True),
            "refine_seeds": number("search.refine_seeds", 1, 100, integer=True),
            "refine_iters": _optional(number("search.refine_iters", 1, 10**7, integer=True)),
        },
    )
    _check_refine_iters(search, kind)
    resources = _typed(
        Resources,
        _section(data, "resources", Resources.__dataclass_fields__),
        "resources",
        {
            "trial_cpu": number("resources.trial_cpu", 0.0, 1024),
            "trial_gpu": number("resources.trial_gpu", 0.0, 64),
            "worker_cpu": number("resources.worker_cpu", 0.0, 1024),
            "worker_gpu": number("resources.worker_gpu", 0.0, 64),
        },
    )
    return SearchSpace(
        _bits_rules(bits["weight"], "bits.weight"),
        _bits_rules(bits["activation"], "bits.activation"),
        _typed(
            ModelRef,
            model,
            "model",
            {
                "input_size": number("model.input_size", 1, 10**5, integer=True),
                "resize": number("model.resize", 1, 10**5, integer=True),
                "mean": _floats("model.mean"),
                "std": _floats("model.std"),
            },
        ),
        _budget(_section(data, "budget", (*BUDGETS, "repair"))),
        kind,
        ptq,
        qat,
        samples,
        objective,
        search,
        resources,
        source,
        distill,
    )


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check``, letting None (YAML's null: the setting's default) through."""
    return lambda value: None if value is None else check(value)


def _check_refine_iters(search: Search, kind: Knob) -> None:
    """``refine_iters`` reruns the finalists' reconstructions longer: it needs finalists and PTQ."""
    if search.refine_iters is None:
        return
    if search.refine_top < 1:
        raise DfqError("search.refine_iters without finalists to rerun",
                       f"refine_top: {search.refine_top}", "refine_top >= 1 with refine_iters",
                       "set search.refine_top, or drop refine_iters")  # fmt: skip
    if not any("ptq" in k for k in kind.values()):
        raise DfqError("search.refine_iters sets reconstruction steps, but no kind reconstructs",
                       f"kind: {list(kind.values())}", "a kind with ptq", "drop refine_iters")  # fmt: skip


def load_space(path_or_name: str | Path) -> SearchSpace:
    """Read a search-space file, or a shipped one by name (``default``, ``cifar_resnet20``, ...)."""
    path = Path(path_or_name)
    if not path.is_file() and (SPACE_DIR / f"{path_or_name}.yaml").is_file():
        path = SPACE_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))
        if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:  # meant as a file, not a shipped name
            what = "search space path is a directory" if path.is_dir() else "search space file not found"
            raise DfqError(what, str(path), f"an existing YAML file, or a shipped name: {', '.join(shipped)}",
                           "check the path")  # fmt: skip
        raise unknown_name("search space", str(path_or_name), shipped, "pass a YAML file or a shipped name")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        msg = " ".join(str(err).split())
        raise DfqError("search space is not valid YAML", str(path), msg, "fix the YAML") from None
    return parse_space(data, str(path))
