"""Data-free fine-tuning: Q's losses, the generator-versus-Q game, presets of the published recipes,
and end-to-end distillation after PTQ."""

from dfq_search.qat.config import PRESETS, GameConfig, load_config
from dfq_search.qat.distill import DistillConfig, distill
from dfq_search.qat.game import Game
from dfq_search.qat.losses import Q_TERMS, QLossParams
from dfq_search.qat.reporter import MemoryReporter, NullReporter, Reporter, TensorBoardReporter
from dfq_search.qat.start import start_q

__all__ = [
    "PRESETS",
    "Q_TERMS",
    "DistillConfig",
    "Game",
    "GameConfig",
    "MemoryReporter",
    "NullReporter",
    "QLossParams",
    "Reporter",
    "TensorBoardReporter",
    "distill",
    "load_config",
    "start_q",
]
