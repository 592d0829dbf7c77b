"""The campaign's synthetic samples: calibration images for every trial, and a disjoint held-out set for
the label-free objective. Made once per (model, settings) and cached on disk, so a resumed campaign, or
the next campaign on the same P, does not synthesize them again.

Sources: ``direct`` (ZeroQ/DSG-style direct optimisation of P's BN statistics), ``gaussian`` (noise,
a baseline), ``bank`` (a Parquet sample bank made by ``dfq-search generate``: generator samples).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from dfq_search.cache import atomic_write, cache_dir
from dfq_search.errors import DfqError
from dfq_search.fingerprint import model_fingerprint
from dfq_search.models import ModelBundle
from dfq_search.search.runner import print_line
from dfq_search.search.space import READ_BY, Samples

Log = Callable[[str], None]
HELDOUT_SEED_OFFSET = 1_000_003  # the held-out set is a different draw from the calibration set


@dataclass
class CampaignSamples:
    calib: Tensor
    heldout: Tensor
    seconds: float  # what making them cost (0 when read from the cache)
    origin: str


def _direct(bundle: ModelBundle, n: int, seed: int, cfg: Samples, device, log: Log, what: str) -> Tensor:
    from dfq_search.synth.direct import synthesize_images

    pre, start = bundle.preprocess, time.perf_counter()

    def progress(done: int, total: int) -> None:
        log(f"  {what}: {done}/{total} images ({time.perf_counter() - start:.0f} s)")

    images, _ = synthesize_images(
        bundle.model,
        pre.shape,
        bundle.num_classes,
        n,
        config=cfg.direct,
        seed=seed,
        device=device,
        preprocess=pre,
        progress=progress,
    )
    return images


def _gaussian(bundle: ModelBundle, n: int, seed: int) -> Tensor:
    return torch.randn(n, *bundle.preprocess.shape, generator=torch.Generator().manual_seed(seed))


def _bank(bundle: ModelBundle, cfg: Samples) -> tuple[Tensor, Tensor]:
    from dfq_search.bank import SampleBank

    bank = SampleBank.open(str(cfg.bank), model_fingerprint(bundle.model))
    want = cfg.calibration + cfg.heldout
    x = torch.cat([s.x.float() for s in bank.iter_samples(want)] or [torch.empty(0)])
    if len(x) < want:
        raise DfqError(
            "too few samples in the bank",
            len(x),
            f"at least {want} (calibration + heldout)",
            "generate more with 'dfq-search generate' or lower samples.calibration",
        )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:want]
    return x[perm[: cfg.calibration]], x[perm[cfg.calibration :]]


def cache_key(bundle: ModelBundle, cfg: Samples) -> str:
    """P, its input shape and every setting the source reads (cfg.direct included: when a default
    changes, old samples are not reused); settings only another source reads are left out, so adding
    or changing one (a generator's) does not throw the synthesized images away."""
    read = {k: v for k, v in asdict(cfg).items() if READ_BY["samples"].get(k, cfg.source) == cfg.source}
    key = json.dumps([model_fingerprint(bundle.model), read, list(bundle.preprocess.shape)], default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def campaign_samples(
    bundle: ModelBundle,
    cfg: Samples,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print_line,
) -> CampaignSamples:
    """The calibration and held-out samples of a campaign (from the cache when made before)."""
    if cfg.source == "bank":
        start = time.perf_counter()
        calib, heldout = _bank(bundle, cfg)
        return CampaignSamples(calib, heldout, time.perf_counter() - start, f"bank {cfg.bank}")
    path = cache_dir() / "synth" / f"campaign-{cache_key(bundle, cfg)}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return CampaignSamples(saved["calib"], saved["heldout"], 0.0, f"cache {path}")
    start = time.perf_counter()
    log(f"synthesizing {cfg.calibration} + {cfg.heldout} samples ({cfg.source}) ...")
    if cfg.source == "direct":
        calib = _direct(bundle, cfg.calibration, cfg.seed, cfg, device, log, "calibration")
        heldout = _direct(bundle, cfg.heldout, cfg.seed + HELDOUT_SEED_OFFSET, cfg, device, log, "held-out")
    else:
        calib = _gaussian(bundle, cfg.calibration, cfg.seed)
        heldout = _gaussian(bundle, cfg.heldout, cfg.seed + HELDOUT_SEED_OFFSET)
    seconds = time.perf_counter() - start
    atomic_write(path, lambda tmp: torch.save({"calib": calib, "heldout": heldout, "seconds": seconds}, tmp))
    return CampaignSamples(calib, heldout, seconds, f"made in {seconds:.1f} s, cached at {path}")
