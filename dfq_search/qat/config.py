"""Typed configuration of a data-free fine-tuning run; YAML keys = field names, unknown keys refused.

A config file has four sections, ``source``, ``sample_loss``, ``q_loss`` and ``train``, each a
dataclass below. ``load_config(preset_or_path, overrides)`` reads a preset (``gdfq``, ``dsg``,
``adasg``, ``adadfq``, ``lrq``) or a YAML file and applies overrides given as a nested dict or as
dotted strings ``"train.iterations=200"`` (values parsed as YAML), then ``paths`` (``{"train.q_lr":
1e-5}``, the search's knobs). A dotted path names one setting: ``sample_loss.weights.bns=0.3`` sets that
term's weight and keeps the others (a nested ``weights`` mapping replaces them all).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dfq_search.config_paths import nest
from dfq_search.errors import DfqError, refuse_unknown_keys, unknown_name
from dfq_search.qat.losses import QLossParams
from dfq_search.synth.losses import TermKnobs

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("adadfq", "adasg", "dsg", "gdfq", "lrq")
GENERATOR_PRESETS = ("gdfq", "dsg", "lrq")  # the generator halves a sample source trains (their own losses)
# the loss terms that read each knob of the sample and Q losses (dfq_search.synth.losses, .qat.losses):
# a config none of whose active terms reads a knob ignores it
READ_BY = {
    "sample_loss": {"use_std": ("bns", "bns_sample"), "slack_eps": ("sda", "lse"), "lambda_l": ("margin",),
                    "lambda_u": ("margin",), "ama_margin": ("ama",), "ama_scale": ("ama",)},
    "q_loss": {"temperature": ("kd", "entropy"), "dkd_alpha": ("dkd",), "dkd_beta": ("dkd",),
               "dkd_temperature": ("dkd",)},
}  # fmt: skip


@dataclass
class SourceConfig:
    """The sample source and its optimiser (Adam)."""

    name: str = "gdfq"
    latent_dim: int = 100
    upsamples: int = 2
    conditional_bn: bool = False
    lka_after: list[int] | None = None  # None: the source's default (lrq: after stages 1 and 2)
    lka_kernels: list[int] = field(default_factory=lambda: [5, 7])
    lka_dilation: int = 3
    pixels: int = 256  # images in the bank of the "pixels" source
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])


@dataclass
class SampleLossConfig(TermKnobs):
    """Weights of the generator's terms (see dfq_search.synth.losses) and their knobs."""

    weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "bns": 0.1})


@dataclass
class QLossConfig(QLossParams):
    """Weights of Q's terms (see dfq_search.qat.losses) and their temperatures."""

    weights: dict[str, float] = field(default_factory=lambda: {"kd": 1.0, "ce": 1.0})


@dataclass
class TrainConfig:
    """The game's schedule. ``q_lr_milestones`` are fractions of ``iterations`` where Q's lr ×0.1."""

    iterations: int = 1000
    warmup: int = 0
    batch_size: int = 32
    q_lr: float = 1e-4
    q_momentum: float = 0.9
    q_weight_decay: float = 1e-4
    q_nesterov: bool = True
    q_lr_milestones: list[float] = field(default_factory=list)
    range_tracking: int = 100  # Q steps that track activation ranges when Q starts unfrozen
    seed: int = 0
    log_every: int = 10
    image_every: int = 0
    checkpoint_every: int = 0


@dataclass
class GameConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    sample_loss: SampleLossConfig = field(default_factory=SampleLossConfig)
    q_loss: QLossConfig = field(default_factory=QLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise DfqError(
            f"config section {where or 'root'}", data, "a mapping of keys to values", "fix the YAML"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    refuse_unknown_keys(f"{where[:-1] or 'top-level'} config", data, fields)
    kwargs = {}
    for key, value in data.items():
        sub = fields[key].default_factory if dataclasses.is_dataclass(fields[key].default_factory) else None
        kwargs[key] = _build(sub, value, f"{where}{key}.") if sub else _typed(value, fields[key], where)
    return cls(**kwargs)


def _typed(value: Any, f: dataclasses.Field, where: str) -> Any:
    """A light type check: numbers where numbers are expected (YAML reads 1e-3 as a string)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}.get(kind)
    if ok and (not isinstance(value, ok) or (kind != "bool" and isinstance(value, bool))):
        article = "an" if kind == "int" else "a"
        raise DfqError(f"config key {where + f.name!r}", value, f"{article} {kind}", f"give {article} {kind}")
    return value


def _merge(base: dict, extra: dict, into_weights: bool = False) -> dict:
    """``extra`` over ``base``; a ``weights`` mapping replaces the base's unless ``into_weights``."""
    out = dict(base)
    for k, v in extra.items():
        deeper = isinstance(v, dict) and isinstance(out.get(k), dict) and (k != "weights" or into_weights)
        out[k] = _merge(out[k], v, into_weights) if deeper else v
    return out


def _yaml(text: str, what: str, value: str, fix: str) -> Any:
    """``yaml.safe_load``: plain data only (tags such as !!python/object are refused), errors as one line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DfqError(f"{what} is not valid YAML", value, " ".join(str(err).split())[:300], fix) from None


def _dotted(overrides: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise DfqError("override", item, "key=value, e.g. train.iterations=200", "add '=value'")
        node = nested
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _yaml(raw, "override", item, "write a plain YAML value, e.g. train.iterations=200")
    return nested


def load_config(
    preset: str | Path | None = None,
    overrides: dict | list[str] | None = None,
    paths: dict[str, Any] | None = None,
) -> GameConfig:
    """A validated :class:`GameConfig` from a preset name or YAML path, then ``overrides``, then
    ``paths`` (see the module docstring)."""
    data: dict = {}
    if preset is not None:
        path = PRESET_DIR / f"{preset}.yaml" if str(preset) in PRESETS else Path(preset)
        if not path.is_file():
            raise unknown_name("preset", str(preset), PRESETS, "name a preset or an existing YAML file")
        data = _yaml(path.read_text(), "config file", str(path), "fix the YAML") or {}
    if overrides:
        dotted = isinstance(overrides, list)
        data = _merge(data, _dotted(overrides) if dotted else overrides, into_weights=dotted)
    if paths:
        data = _merge(data, nest(paths), into_weights=True)
    return _build(GameConfig, data, "")


def ignored_by(cfg: GameConfig, path: str) -> str | None:
    """Why ``cfg`` would ignore the setting at ``path`` (None: it reads it): a knob of a loss that no
    active term of that loss reads (``READ_BY``)."""
    section, _, key = path.partition(".")
    readers = READ_BY.get(section, {}).get(key)
    if readers is None:
        return None
    active = sorted(k for k, w in getattr(cfg, section).weights.items() if w > 0)
    if set(readers) & set(active):
        return None
    return f"{key} is read by the {' / '.join(readers)} term, and its {section} has {', '.join(active)}"
