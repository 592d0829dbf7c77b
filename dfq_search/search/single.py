"""One quantization run with a chosen method, outside a campaign (``dfq-search quantize --method``).

It is a campaign trial, run once in this process: the same settings (paths of ``PTQConfig`` and of the
game's config, validated by :func:`~dfq_search.search.method.parse_method` exactly as a space's), the
same samples (:func:`~dfq_search.search.samples.campaign_samples`, cached), the same
:func:`~dfq_search.search.trial.run_trial` and label-free score; no second copy of the method wiring.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfq_search.errors import DfqError
from dfq_search.models import ModelBundle
from dfq_search.quant import BitPlan
from dfq_search.search.method import parse_method
from dfq_search.search.objective import FidelityScorer
from dfq_search.search.samples import campaign_samples
from dfq_search.search.space import Samples
from dfq_search.search.trial import TrialContext, run_trial
from dfq_search.synth.bn import require_bn_for_samples

# the CLI's name -> a trial kind
METHODS = {"ptq": "ptq", "finetune": "qat", "ptq+finetune": "ptq+qat", "ptq+distill": "ptq+distill"}


@dataclass(frozen=True)
class Method:
    """What to run: ``name`` (a key of ``METHODS``), the PTQ and fine-tuning settings by path, the
    samples, and the seed of the reconstruction or game."""

    name: str
    ptq: Mapping[str, Any] = field(default_factory=dict)
    finetune: Mapping[str, Any] = field(default_factory=dict)
    samples: Samples = field(default_factory=Samples)
    seed: int = 0
    distill: Mapping[str, Any] = field(default_factory=dict)  # DistillConfig fields (ptq+distill)

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise DfqError("--method", self.name, f"rtn or one of {', '.join(METHODS)}", "pick one")
        kind = METHODS[self.name]
        for part, given, flags in (("ptq", self.ptq, "--modcap-k, --recon-iters, --set ptq.*"),
                                   ("qat", self.finetune, "--finetune-*, --set finetune.*"),
                                   ("distill", self.distill, "--set distill.*")):  # fmt: skip
            if given and part not in kind:
                raise DfqError(f"{flags} with --method {self.name}", sorted(given),
                               f"settings of the steps --method {self.name} runs", "drop them")  # fmt: skip
        if "qat" in kind and "train.iterations" not in self.finetune:
            raise DfqError(f"--method {self.name} without --finetune-iters", None,
                           "the game's steps, warm-up included (the presets' own are the papers' 80,000)",
                           "pass e.g. --finetune-iters 1000 (the presets warm up 800: --set "
                           "finetune.train.warmup=N for fewer)")  # fmt: skip
        try:  # the space's checks: every value built into its config, a setting no step reads refused
            parse_method({"kind": kind, "ptq": dict(self.ptq), "qat": dict(self.finetune),
                          "distill": dict(self.distill)})  # fmt: skip
        except DfqError as err:
            what = err.what.replace("method.qat", "finetune").replace("method.ptq", "ptq")
            what = what.replace("method.distill", "distill")
            raise DfqError(what, err.value, err.allowed, err.fix.replace("method.", "--set ")) from None

    @property
    def config(self) -> dict[str, Any]:
        """The trial config of this method for ``plan`` (set by :func:`quantize_once`)."""
        return {
            "kind": METHODS[self.name],
            **{f"ptq.{k}": v for k, v in self.ptq.items()},
            **{f"qat.{k}": v for k, v in self.finetune.items()},
            **{f"distill.{k}": v for k, v in self.distill.items()},
            "seed": self.seed,
        }


@dataclass
class Outcome:
    metrics: dict[str, Any]  # the trial's final metrics: score, agreement, kl, mse (held-out samples)
    samples_origin: str
    samples_s: float
    method_s: float


def quantize_once(
    bundle: ModelBundle,
    plan: BitPlan,
    method: Method,
    out: Path,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    real: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Outcome:
    """Quantize ``bundle`` by ``plan`` with ``method`` and write the checkpoint to ``out``. ``real``:
    (calibration, held-out) real images in P's input space instead of the method's samples (the
    real-data reference)."""
    if method.ptq.get("modcap_k"):  # before the samples are made: k must fit the model's unit pairs
        from dfq_search.ptq.modcap import check_k
        from dfq_search.ptq.units import find_units

        check_k(
            find_units(bundle.model, bundle.preprocess.example_input(device=device)), method.ptq["modcap_k"]
        )
    if real is None:
        require_bn_for_samples(bundle.model, bundle.name, method.samples.source)
        samples = campaign_samples(bundle, method.samples, device, log)
        calib, heldout, origin, seconds = samples.calib, samples.heldout, samples.origin, samples.seconds
    else:
        (calib, heldout), origin, seconds = real, "real images", 0.0
    log(f"samples: {len(calib)} calibration + {len(heldout)} held-out ({origin})")
    ctx = TrialContext(
        p=bundle.model,
        model_name=bundle.name,
        num_classes=bundle.num_classes,
        input_shape=bundle.preprocess.shape,
        calib=calib,
        scorer=FidelityScorer(bundle.model, heldout),
        reports=1,
        eval_fraction=1.0,
        device=str(device),
        preprocess=bundle.preprocess,
        heldout=heldout,
    )

    def keep(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is not None:
            shutil.copyfile(Path(checkpoint) / "model.pt", out)

    log(f"{method.name}: {plan.to_dict()}")
    t0 = time.perf_counter()
    metrics = run_trial({**method.config, "plan": plan.to_dict()}, ctx, keep)
    return Outcome(metrics, origin, seconds, time.perf_counter() - t0)
