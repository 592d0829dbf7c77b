"""Per-step metrics out of the game through a small interface; TensorBoard only at the edge.

A reporter has ``scalars(step, values)``, ``images(step, tag, x)`` and ``close()``. ``MemoryReporter``
keeps everything (tests, benchmarks); ``TensorBoardReporter`` imports tensorboard only when built.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Reporter(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def images(self, step: int, tag: str, x: Tensor) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    """Drops everything."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def images(self, step: int, tag: str, x: Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryReporter(NullReporter):
    """Keeps (step, values) rows and the number of image grids received."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.n_images = 0

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.rows.append((step, dict(values)))

    def images(self, step: int, tag: str, x: Tensor) -> None:
        self.n_images += 1

    def series(self, key: str) -> list[float]:
        return [v[key] for _, v in self.rows if key in v]


class TensorBoardReporter:
    """Writes scalars and image grids (de-normalised with ``mean``/``std``) to a TensorBoard log dir."""

    def __init__(
        self, logdir: str, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
    ):
        from torch.utils.tensorboard import SummaryWriter  # lazy: importing dfq_search stays lean

        self.writer, self.mean, self.std = SummaryWriter(logdir), mean, std

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def images(self, step: int, tag: str, x: Tensor) -> None:
        from torchvision.utils import make_grid

        x = x.detach().cpu()[:64]
        if self.mean is not None and self.std is not None:
            x = x * x.new_tensor(self.std).view(1, -1, 1, 1) + x.new_tensor(self.mean).view(1, -1, 1, 1)
        self.writer.add_image(tag, make_grid(x.clamp(0, 1), nrow=8), step)

    def close(self) -> None:
        self.writer.close()
