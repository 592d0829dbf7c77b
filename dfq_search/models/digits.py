"""``digits_cnn``: the embedded default model, a small BN CNN for scikit-learn's 8x8 digits.

Needs no download: with ``weights`` None it loads ``cache_dir()/weights/digits_cnn-v1.pt``, and
trains it once when missing (seed 0, on the 70% train split of ``load_digits_split``, Adam, a few
seconds on CPU; about 97-99% on the 30% test split), then saves it atomically.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dfq_search.cache import atomic_write, cache_dir
from dfq_search.data.digits import load_digits_split
from dfq_search.errors import DfqError
from dfq_search.models.base import ModelBundle, Preprocess, seeded_build
from dfq_search.models.registry import register_model
from dfq_search.models.tiny import conv_bn, head
from dfq_search.models.weights import load_weights

log = logging.getLogger(__name__)

# Pixel mean and std of the digits scaled to [0, 1].
DIGITS_PREPROCESS = Preprocess(8, None, (0.305,), (0.376,), channels=1)
WEIGHTS_NAME = "digits_cnn-v1.pt"  # bump the version when the architecture or training changes
SEED, EPOCHS, BATCH, LR = 0, 30, 64, 3e-3


class DigitsCNN(nn.Module):
    """8x8x1 -> conv 16 -> conv 32 /2 -> conv 64 -> global pool -> linear (about 24k params)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 16), conv_bn(16, 32, stride=2), conv_bn(32, 64))
        self.head = head(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digits_cnn(epochs: int = EPOCHS, seed: int = SEED) -> DigitsCNN:
    """Train a ``DigitsCNN`` on the train split; the same weights for the same seed.

    Runs on one CPU thread: the model is too small to gain from more, the result then does not
    depend on the machine's core count, and busy machines do not stall on spinning threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _train(DigitsCNN(), epochs, torch.Generator().manual_seed(seed))
    finally:
        torch.set_num_threads(threads)


def _train(model: DigitsCNN, epochs: int, gen: torch.Generator) -> DigitsCNN:
    data = load_digits_split("train")
    x, y = DIGITS_PREPROCESS.normalize(data.images), data.labels
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = epochs * -(-len(y) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(BATCH):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def default_weights() -> Path:
    """The cached default weights, trained and saved first if they are not there yet."""
    path = cache_dir() / "weights" / WEIGHTS_NAME
    if not path.is_file():
        start = time.perf_counter()
        model = train_digits_cnn()
        atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
        log.info("trained digits_cnn in %.1f s, saved to %s", time.perf_counter() - start, path)
    return path


@register_model("digits_cnn")
def digits_cnn(weights: Path | None, num_classes: int | None) -> ModelBundle:
    """The default model: trained weights from the cache (trained once) unless a file is given.

    A ``num_classes`` other than 10 needs a weights file for that head.
    """
    classes = num_classes or 10
    if weights is None and classes != 10:
        raise DfqError(
            "digits_cnn's default weights have 10 classes",
            num_classes,
            "num_classes None or 10 without a weights file",
            "drop num_classes, or pass weights trained for that head",
        )
    model = seeded_build(lambda: DigitsCNN(classes))
    load_weights(model, weights or default_weights(), name="digits_cnn")
    return ModelBundle(model.eval(), DIGITS_PREPROCESS, "digits_cnn", classes)
