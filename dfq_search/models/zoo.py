"""Trained weights for the panel models (``dfq_search.models.panel``): recipes, training, the cache.

``zoo_weights("cifar_vgg")`` is the path of the cached weights, ``cache_dir()/zoo/cifar_vgg-v1.pt``
(a plain state dict, for ``--weights``); missing weights raise an error naming the command that
trains them (``python benchmarks/zoo.py --models cifar_vgg``), or are trained when ``train=True``.

Recipes (seeded: the same file for the same recipe on the same machine and thread count):

* CIFAR models: the 5,000 images of ``cifar10/train-5k`` with random crop (4-pixel zero padding)
  and horizontal flip, knowledge distillation from the pretrained ResNet-20 (temperature ``T``):
  ``loss = alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE(student, label)``, since 5k images
  are few for training from labels alone. Reads the reference data under ``shared_data``
  (``$DFQ_SHARED_DATA``, else ``../shared/data``).
* ``mnist_dwnet``: the train split of MNIST 5k (``dfq_search.data.mnist``), random 2-pixel shifts,
  cross-entropy.

All: SGD with Nesterov momentum, one-cycle learning rate, weight decay on conv and linear weights
only, batch 128. Epochs are set so each CIFAR model trains in under about ten minutes on one CPU
thread. ``<name>-v1.json`` beside the weights records the recipe, the seconds and the losses.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dfq_search.cache import atomic_write, cache_dir
from dfq_search.data.image_data import ImageData
from dfq_search.errors import DfqError, unknown_name
from dfq_search.models.base import Preprocess
from dfq_search.models.registry import create_model

VERSION = 1  # bump when a recipe or an architecture changes, so old files are not taken for new
SEED = 0
SHARED_ENV = "DFQ_SHARED_DATA"
TEACHER = ("cifar_resnet20", "weights/resnet20-12fca82f.th")
CIFAR_TRAIN, CIFAR_TEST = "cifar10/train-5k", "cifar10/test"


@dataclass(frozen=True)
class Recipe:
    """How one panel model is trained; ``teacher`` None trains on labels alone."""

    dataset: str  # "cifar10" or "mnist"
    epochs: int
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch: int = 128
    pad: int = 4  # random-crop padding in pixels
    flip: bool = True
    teacher: bool = True
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the distillation term


RECIPES: dict[str, Recipe] = {
    "cifar_mobilenetv2": Recipe("cifar10", epochs=30),
    "cifar_vgg": Recipe("cifar10", epochs=40, lr=0.05),
    "cifar_effnet": Recipe("cifar10", epochs=25),
    "mnist_dwnet": Recipe("mnist", epochs=15, pad=2, flip=False, teacher=False),
}


def shared_data_dir() -> Path:
    """``$DFQ_SHARED_DATA`` when set, else ``../shared/data`` (relative to the repository root)."""
    return Path(os.environ.get(SHARED_ENV, "../shared/data")).expanduser()


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise unknown_name("zoo model", name, RECIPES, "pass one of the panel models that the zoo trains")
    return RECIPES[name]


def zoo_path(name: str, epochs: int | None = None) -> Path:
    """Where the weights of ``name`` go; a non-default ``epochs`` gets its own file (``-e<N>``)."""
    default = recipe(name).epochs
    tag = "" if epochs is None or epochs == default else f"-e{epochs}"
    return cache_dir() / "zoo" / f"{name}-v{VERSION}{tag}.pt"


def zoo_weights(
    name: str,
    *,
    train: bool = False,
    shared_data: Path | None = None,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The cached weights of panel model ``name`` (default recipe), trained first if ``train``."""
    path = zoo_path(name)
    if path.is_file():
        return path
    if not train:
        raise DfqError(
            f"{name} has no trained weights in the cache yet",
            str(path),
            "weights trained once by the zoo and cached there",
            f"run 'python benchmarks/zoo.py --models {name}' (a few minutes on one CPU thread), "
            f"or call zoo_weights({name!r}, train=True)",
        )
    return ensure_trained(name, shared_data=shared_data, threads=threads, progress=progress)


def ensure_trained(
    name: str,
    *,
    epochs: int | None = None,
    force: bool = False,
    shared_data: Path | None = None,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Train ``name`` and save its weights (atomically) unless cached; ``force`` trains again."""
    path = zoo_path(name, epochs)
    if path.is_file() and not force:
        return path
    start = time.perf_counter()
    model, losses = train_zoo_model(
        name, epochs=epochs, shared_data=shared_data, threads=threads, progress=progress
    )
    seconds = time.perf_counter() - start
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    meta = {
        "name": name, "version": VERSION, "seed": SEED, "threads": threads, "seconds": round(seconds, 1),
        "recipe": {**asdict(recipe(name)), "epochs": epochs or recipe(name).epochs}, "losses": losses,
    }  # fmt: skip
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return path


def zoo_meta(path: Path) -> dict | None:
    """The record written beside a weights file (recipe, seconds, losses), or None."""
    meta = path.with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else None


def load_split(name: str, split: str, shared_data: Path | None = None) -> ImageData:
    """The ``train`` or ``test`` images of ``name``'s recipe, decoded for its preprocessing."""
    if recipe(name).dataset == "mnist":
        from dfq_search.data.mnist import load_mnist_split

        return load_mnist_split(split)  # type: ignore[arg-type]
    from dfq_search.data.folder import load_image_folder

    folder = _shared(shared_data, CIFAR_TRAIN if split == "train" else CIFAR_TEST)
    return load_image_folder(folder, create_model(name).preprocess)


def train_zoo_model(
    name: str,
    *,
    epochs: int | None = None,
    seed: int = SEED,
    shared_data: Path | None = None,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Module, list[float]]:
    """Train ``name`` by its recipe; returns the model (eval mode) and the mean loss of each epoch."""
    rec = recipe(name)
    epochs = rec.epochs if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DfqError("bad epochs", epochs, "an int >= 1", "pass e.g. 10")
    bundle = create_model(name)  # random init under the registry's seed
    data = load_split(name, "train", shared_data)
    teacher = None
    if rec.teacher:
        teacher = create_model(TEACHER[0], _shared(shared_data, TEACHER[1])).model
        teacher = teacher.to(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _fit(bundle.model, bundle.preprocess, data, teacher, rec, epochs, seed, progress)
    finally:
        torch.set_num_threads(before)


def _fit(
    model: nn.Module,
    preprocess: Preprocess,
    data: ImageData,
    teacher: nn.Module | None,
    rec: Recipe,
    epochs: int,
    seed: int,
    progress: Callable[[str], None] | None,
) -> tuple[nn.Module, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    model = model.to(memory_format=torch.channels_last).train()
    decay = [p for p in model.parameters() if p.dim() > 1]  # conv and linear weights, not BN or biases
    rest = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": rec.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=rec.lr, momentum=0.9, nesterov=True,
    )  # fmt: skip
    steps_per_epoch = len(data) // rec.batch  # the last partial batch is dropped
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rec.lr, total_steps=epochs * steps_per_epoch)
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        total, correct, loss_sum = 0, 0, 0.0
        for idx in torch.randperm(len(data), generator=gen)[: steps_per_epoch * rec.batch].split(rec.batch):
            images = augment(data.images[idx], rec.pad, rec.flip, gen)
            x = preprocess.normalize(images).contiguous(memory_format=torch.channels_last)
            y = data.labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.inference_mode():
                    target = teacher(x)
                loss = rec.alpha * kd_loss(logits, target.clone(), rec.temperature) + (1 - rec.alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
        losses.append(round(loss_sum / total, 4))
        if progress:
            seconds = time.perf_counter() - start
            top1 = 100 * correct / total
            progress(
                f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}, train top-1 {top1:.1f}%, {seconds:.0f} s"
            )
    return model.to(memory_format=torch.contiguous_format).eval(), losses


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: ``T^2 KL(softmax(teacher / T) || softmax(student / T))``."""
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


def augment(images: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop of the zero-padded uint8 batch (``pad`` pixels) and, if ``flip``, random h-flip."""
    n, _, h, w = images.shape
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [n, 1, h, 1]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [n, 1, 1, w]
        batch, channels = torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[:, None, None]
        images = padded[batch, channels, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=gen) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images


def _shared(shared_data: Path | None, rel: str) -> Path:
    root = shared_data if shared_data is not None else shared_data_dir()
    path = Path(root) / rel
    if not path.exists():
        raise DfqError(
            "reference data for the zoo not found",
            str(path),
            f"the shared data folder holding {rel}",
            f"set {SHARED_ENV} to the shared/data folder, or run from the repository root",
        )
    return path
