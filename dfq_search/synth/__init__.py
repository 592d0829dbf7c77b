"""Synthetic samples from P alone: BN-statistics hooks, sample losses, generators, direct optimisation."""

from dfq_search.synth.bn import BNStats, bn_layers, bn_loss, bn_statistics, moments, sample_bn_loss
from dfq_search.synth.conformance import check_source
from dfq_search.synth.direct import DirectConfig, synthesize_images
from dfq_search.synth.generators import SOURCES, GDFQGenerator, LargeKernelAttention, PixelBank, build_source
from dfq_search.synth.losses import TERMS, TermParams, normalized_disagreement, slack_from_noise
from dfq_search.synth.objective import SampleObjective

__all__ = [
    "SOURCES",
    "TERMS",
    "BNStats",
    "DirectConfig",
    "GDFQGenerator",
    "LargeKernelAttention",
    "PixelBank",
    "SampleObjective",
    "TermParams",
    "bn_layers",
    "bn_loss",
    "bn_statistics",
    "build_source",
    "check_source",
    "moments",
    "normalized_disagreement",
    "sample_bn_loss",
    "slack_from_noise",
    "synthesize_images",
]
