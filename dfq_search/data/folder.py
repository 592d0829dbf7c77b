"""An ImageFolder-layout directory (``root/<class>/<image>``), decoded once and cached.

Labels follow torchvision's ``ImageFolder``: class folders in sorted order, files sorted by name.
The decoded uint8 tensor is saved to ``cache_dir()/images/<key>.npy`` (atomically) and memoized in
the process, so JPEGs are decoded once per change of the folder or of the input geometry. The key
hashes the absolute path, every file's name, size and mtime, and ``input_size``/``resize``/
``channels`` (mean and std are applied later, per batch).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dfq_search.cache import atomic_write, cache_dir
from dfq_search.data.image_data import ImageData
from dfq_search.errors import DfqError

if TYPE_CHECKING:
    from dfq_search.models.base import Preprocess

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_FORMAT_VERSION = 1  # bump when decoding changes, to invalidate old cache files
_MEMO: dict[str, ImageData] = {}
_LAYOUT = "root/<class>/<image>.jpg (one sub-folder per class, like torchvision's ImageFolder)"


def load_image_folder(
    path: str | Path, preprocess: Preprocess, limit_per_class: int | None = None
) -> ImageData:
    """The images under ``path`` decoded for ``preprocess``; the first ``limit_per_class`` per class."""
    if limit_per_class is not None and (
        isinstance(limit_per_class, bool) or not isinstance(limit_per_class, int) or limit_per_class < 1
    ):
        raise DfqError("bad limit_per_class", limit_per_class, "None or an int >= 1", "pass e.g. 100")
    root = Path(path).expanduser().resolve()
    classes, files, labels = _scan(root, limit_per_class)
    key = _key(root, files, preprocess)
    if key in _MEMO:
        return _MEMO[key]
    npy = cache_dir() / "images" / f"{key}.npy"
    images = _read_cached(npy, len(files), preprocess)
    if images is None:
        images = _decode_all([root / f for f, _, _ in files], preprocess)
        atomic_write(npy, lambda tmp: _save(tmp, images))
    data = ImageData(torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), classes)
    _MEMO[key] = data
    return data


def clear_memo() -> None:
    """Forget the in-process copies (the on-disk cache stays)."""
    _MEMO.clear()


def decode_image(path: Path, preprocess: Preprocess) -> np.ndarray:
    """One image as uint8 [C, H, W]: channels converted, shorter side resized, center-cropped.

    Matches torchvision's ``Resize(r)`` (bilinear, antialiased on PIL) then ``CenterCrop(s)``;
    ``resize`` None means shorter side to ``input_size``, a no-op for images already that size.
    """
    size = preprocess.input_size
    with Image.open(path) as im:
        im = im.convert("RGB" if preprocess.channels == 3 else "L")
        w, h = im.size
        short = preprocess.resize or size
        if min(w, h) != short:
            scale = short / min(w, h)
            new = (short, int(h * scale)) if w <= h else (int(w * scale), short)
            im = im.resize(new, Image.BILINEAR)
            w, h = im.size
        if (w, h) != (size, size):
            left, top = round((w - size) / 2.0), round((h - size) / 2.0)
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_all(paths: list[Path], preprocess: Preprocess) -> np.ndarray:
    out = np.empty((len(paths), *preprocess.shape), dtype=np.uint8)

    def work(i: int) -> None:
        try:
            out[i] = decode_image(paths[i], preprocess)
        except (OSError, UnidentifiedImageError) as exc:
            raise DfqError(
                "cannot decode image", str(paths[i]), "a readable image file", "remove or replace it"
            ) from exc

    # PIL releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(work, range(len(paths)), chunksize=256))
    return out


def _scan(root: Path, limit: int | None) -> tuple[list[str], list[tuple[str, int, int]], list[int]]:
    """Class names, (relative path, size, mtime_ns) per image, and labels, in ImageFolder order."""
    if not root.exists():
        raise DfqError(
            "image folder not found", str(root), f"a directory laid out as {_LAYOUT}", "check the path"
        )
    if not root.is_dir():
        raise DfqError(
            "image folder is not a directory",
            str(root),
            f"a directory laid out as {_LAYOUT}",
            "pass the folder that holds the class folders",
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files: list[tuple[str, int, int]] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(root / name) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)),
            key=lambda e: e.name,
        )[:limit]
        if not entries:
            empty.append(name)
        for e in entries:
            st = e.stat()
            files.append((f"{name}/{e.name}", st.st_size, st.st_mtime_ns))
            labels.append(label)
    if not classes or empty:
        raise DfqError(
            "no class folders with images" if not classes else f"class folders without images: {empty[:5]}",
            str(root),
            f"a directory laid out as {_LAYOUT}, images ending in {', '.join(IMG_EXTENSIONS)}",
            "point at the folder whose sub-folders are the classes",
        )
    return classes, files, labels


def _key(root: Path, files: list[tuple[str, int, int]], preprocess: Preprocess) -> str:
    spec = {
        "version": _FORMAT_VERSION,
        "root": str(root),
        "files": files,
        "geometry": [preprocess.input_size, preprocess.resize, preprocess.channels],
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:32]


def _read_cached(npy: Path, n: int, preprocess: Preprocess) -> np.ndarray | None:
    """The cached array if it exists and has the expected shape; None otherwise (then re-decoded)."""
    try:
        images = np.load(npy, allow_pickle=False)
    except (OSError, ValueError):
        return None
    ok = images.dtype == np.uint8 and images.shape == (n, *preprocess.shape)
    return images if ok else None


def _save(tmp: Path, images: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object, so numpy does not append '.npy' to the name
        np.save(f, images, allow_pickle=False)
