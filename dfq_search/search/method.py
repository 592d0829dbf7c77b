"""The method knobs of a search space: each a dotted path into the config that owns the setting, and a
distribution (:mod:`.knobs`: fixed, choices or a range).

    method:
      kind: [ptq, ptq+qat]
      ptq:                             # paths of dfq_search.ptq.PTQConfig (recon.*: its ReconConfig)
        modcap_k: [0, 1, 2]
        recon.iters: 100
      qat:                             # preset: a game preset; the rest: paths of its GameConfig
        preset: adadfq
        sample_loss.lambda_l: {low: 0.0, high: 0.4}
        train.q_lr: {low: 1.0e-6, high: 1.0e-4, log: true}

Defaults, types and allowed values are the configs' own (a setting not given is the config's default,
or the preset's): a space is checked by building every config its knobs can give (every choice, both
ends of every range; each knob in turn beside the others' first values when the combinations are too
many), and a knob that every one of them would ignore (a bound of a loss term the preset lacks,
``percentile`` without ``act_range: percentile``, ModCap's settings at ``modcap_k: 0``) is refused with
the reason. A trial builds its configs the same way (:func:`ptq_config`, :func:`game_config`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from dfq_search.config_paths import nest
from dfq_search.errors import DfqError
from dfq_search.search.knobs import Knob, one_of, parse_knob

KINDS = ("ptq", "qat", "ptq+qat", "ptq+distill")
PARTS = ("ptq", "qat", "distill")  # the method sections a kind can run
PRESET, DEFAULT_PRESET = "preset", "adadfq"
# the trial's own game settings, under the knobs: no log lines from a worker, no lr steps in its short run
TRIAL_GAME = {"train.log_every": 0, "train.q_lr_milestones": []}
# set by the campaign for every trial (its seed, other seeds in refinement): never a knob
CAMPAIGN_SET = {"ptq": ("recon.seed",), "qat": ("train.seed",), "distill": ("seed",)}
# the short names of the knobs before they were config paths (issue 15): refused with the new path
RENAMED = {
    "ptq": {"iters": "recon.iters", "batch_size": "recon.batch_size", "lam": "recon.lam",
            "qdrop": "recon.qdrop"},
    "qat": {"generator": "source.name", "steps": "train.iterations (= steps + warmup)",
            "warmup": "train.warmup", "batch_size": "train.batch_size", "q_lr": "train.q_lr",
            "lambda_l": "sample_loss.lambda_l", "lambda_u": "sample_loss.lambda_u",
            "disagree": "sample_loss.weights.disagree", "agree": "sample_loss.weights.agree",
            "bns": "sample_loss.weights.bns"},
    "distill": {},
}  # fmt: skip
MAX_COMBINATIONS = 4096
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def ptq_config(knobs: Mapping[str, Any], seed: int = 0) -> Any:
    """The :class:`~dfq_search.ptq.PTQConfig` of a trial's ``ptq.`` knobs (paths -> values)."""
    from dfq_search.ptq.config import PTQConfig

    return PTQConfig.from_dict(nest({**knobs, "recon.seed": seed}))


def game_config(knobs: Mapping[str, Any], seed: int = 0) -> Any:
    """The :class:`~dfq_search.qat.config.GameConfig` of a trial's ``qat.`` knobs: the preset, the
    trial's own settings (``TRIAL_GAME``), then the knobs' paths."""
    from dfq_search.qat.config import load_config

    paths = {k: v for k, v in knobs.items() if k != PRESET}
    return load_config(knobs.get(PRESET, DEFAULT_PRESET), paths={**TRIAL_GAME, **paths, "train.seed": seed})


def distill_config(knobs: Mapping[str, Any], seed: int = 0) -> Any:
    """The :class:`~dfq_search.qat.distill.DistillConfig` of a trial's ``distill.`` knobs (its field
    names -> values); a name that is not a field is refused with the fields there are."""
    from dfq_search.qat.distill import DistillConfig

    fields = sorted(set(DistillConfig.__dataclass_fields__) - {"seed"})
    unknown = sorted(set(knobs) - set(fields))
    if unknown:
        raise DfqError("method.distill: unknown settings", unknown, f"fields of DistillConfig: {fields}",
                       "fix the names in method.distill")  # fmt: skip
    return DistillConfig(**{**{k: _number(v) for k, v in knobs.items()}, "seed": seed})  # 1e-4 too


def _distill_ignores(cfg: Any, path: str) -> str | None:
    """Why a distillation config would ignore ``path`` (None: it reads it)."""
    if path in ("adv_eps", "adv_fraction") and not cfg.adv_steps:
        return f"{path} is read with adversarial images only, and adv_steps is 0"
    if path == "weight_lr_scale" and cfg.trainable == "steps":
        return "weight_lr_scale is read when the weights train, and trainable is 'steps'"
    return None


def _number(value: Any) -> Any:
    """YAML reads 1e-3 as a string: a string written as a number is that number."""
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def _parse(part: str, key: Any, raw: Any) -> Knob:
    key = str(key)
    if key in RENAMED[part]:
        new = RENAMED[part][key]
        raise DfqError(f"method.{part}.{key} is now method.{part}.{new}", key,
                       f"knobs are paths of the config that owns the setting ({_OWNER[part]})",
                       f"rename {key} to {new.split(' ')[0]} in the space file")  # fmt: skip
    if key in CAMPAIGN_SET[part]:
        raise DfqError(f"method.{part}.{key}", raw, "a setting the campaign sets for every trial (its "
                       "seed; other seeds in refinement)",
                       f"drop {key}; set samples.seed or search.refine_seeds")  # fmt: skip
    if key == PRESET and part == "qat":
        from dfq_search.qat.config import PRESETS

        return parse_knob("qat.preset", raw, one_of("method.qat.preset", PRESETS))
    if isinstance(raw, Mapping):
        raw = {k: _number(v) if k in ("low", "high") else v for k, v in raw.items()}
    else:
        raw = [_number(v) for v in raw] if isinstance(raw, list) else _number(raw)
    return parse_knob(f"{part}.{key}", raw)


_OWNER = {"ptq": "dfq_search.ptq.PTQConfig, recon.*: ReconConfig",
          "qat": "the preset's GameConfig: source.*, sample_loss.*, q_loss.*, train.*",
          "distill": "dfq_search.qat.distill.DistillConfig: steps, lr, temperature, ..."}  # fmt: skip


Knobs = dict[str, Knob]


def parse_method(section: Mapping[str, Any]) -> tuple[Knob, Knobs, Knobs, Knobs]:
    """``kind`` and the ``ptq``, ``qat`` and ``distill`` knobs (by path) of a space's ``method``
    section, checked by building every config they can give."""
    kind = parse_knob("kind", section.get("kind", "ptq"), one_of("method.kind", KINDS))
    parts = {}
    for part in PARTS:
        raw = section.get(part) or {}
        if not isinstance(raw, Mapping):
            raise DfqError(f"method.{part}", raw, "a mapping of knobs", "fix the YAML")
        parts[part] = {str(k): _parse(part, k, v) for k, v in raw.items()}
        if raw and not any(part in k for k in kind.values()):
            raise DfqError(f"method.{part} knobs with method.kind {list(kind.values())}", sorted(raw),
                           f"a kind that runs {part} ({', '.join(k for k in KINDS if part in k)}): no "
                           "trial would use them",
                           f"drop method.{part}, or add a kind with {part}")  # fmt: skip
    parts["qat"].setdefault(PRESET, Knob("qat.preset", (DEFAULT_PRESET,)))
    _check("ptq", parts["ptq"], ptq_config, lambda cfg, path: cfg.ignored(path))
    if any("qat" in k for k in kind.values()):
        _check("qat", parts["qat"], _game, _game_ignores)
        _require_length(parts["qat"])
    if any("distill" in k for k in kind.values()):
        _check("distill", parts["distill"], distill_config, _distill_ignores)
    return kind, parts["ptq"], parts["qat"], parts["distill"]


def _require_length(knobs: Mapping[str, Knob]) -> None:
    """A fine-tuning trial's length is the space's to say: the presets' own is the papers' full schedule
    (80,000 steps: days per trial on a CPU, hours on a GPU), never what a search means by default."""
    if "train.iterations" not in knobs:
        steps = {p: game_config({PRESET: p}).train.iterations for p in knobs[PRESET].values()}
        raise DfqError("method.qat without train.iterations", steps,
                       "the steps of every fine-tuning trial, given in the space (the presets' own are "
                       "the papers' full schedules)",
                       "add e.g. train.iterations: 1000 to method.qat (presets warm up 800)")  # fmt: skip


def _game(combo: Mapping[str, Any]) -> Any:
    from dfq_search.qat.game import check_config

    cfg = game_config(combo)
    check_config(cfg)
    return cfg


def _game_ignores(cfg: Any, path: str) -> str | None:
    from dfq_search.qat.config import ignored_by

    return None if path == PRESET else ignored_by(cfg, path)


def _combinations(knobs: Mapping[str, Knob]) -> Iterator[dict[str, Any]]:
    """Every combination of the knobs' values (ends of ranges), or, when there are more than
    ``MAX_COMBINATIONS``, each knob's values in turn beside the others' first."""
    values = {k: knob.values() for k, knob in knobs.items()}
    if math.prod(len(v) for v in values.values()) <= MAX_COMBINATIONS:
        for combo in itertools.product(*values.values()):
            yield dict(zip(values, combo, strict=True))
        return
    first = {k: v[0] for k, v in values.items()}
    for k, vs in values.items():
        for v in vs:
            yield {**first, k: v}


def _check(
    part: str,
    knobs: Mapping[str, Knob],
    build: Callable[[dict[str, Any]], Any],
    ignores: Callable[[Any, str], str | None],
) -> None:
    """Build every combination's config (``build`` raises for a value the config refuses), then refuse
    a knob that every one of them ignores (``ignores(config, path)``: why, or None)."""
    unread = dict.fromkeys(knobs, "")  # path -> why the configurations so far ignore it
    for combo in _combinations(knobs):
        shown = {k: v for k, v in combo.items() if not knobs[k].fixed}
        at = f" (at {shown})" if shown else ""
        try:
            cfg = build(combo)
        except DfqError as err:
            raise DfqError(f"method.{part}: {err.what}{at}", err.value, err.allowed, err.fix) from None
        except (TypeError, ValueError) as err:  # a value of the wrong type compared or converted
            raise DfqError(f"method.{part}{at}", combo, f"values of the config's field types ({err})",
                           "fix the value's type") from None  # fmt: skip
        for path in list(unread):
            why = ignores(cfg, path)
            if why is None:
                del unread[path]
            else:
                unread[path] = unread[path] or why
    for path, why in unread.items():
        preset = f" with preset {', '.join(map(repr, knobs[PRESET].values()))}" if PRESET in knobs else ""
        raise DfqError(f"method.{part}.{path}{preset}", list(knobs[path].values()),
                       f"a setting some trial reads ({why}, in every configuration the space gives)",
                       f"drop {path}, or add a value that makes it read (e.g. a preset whose loss has the "
                       "term, act_range: percentile, modcap_k > 0)")  # fmt: skip
