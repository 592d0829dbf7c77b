"""Where dfq_search keeps what it computes once: decoded images, trained default weights."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "DFQ_SEARCH_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$DFQ_SEARCH_CACHE`` when set, else ``~/.cache/dfq_search``.

    Read at every call (not at import), so tests and users can point it elsewhere at run time.
    The directory is not created here; writers create the sub-directory they need.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dfq_search"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place.

    ``os.replace`` is atomic on one file system, so a concurrent reader sees either no file or the
    whole file, never a half-written one; a failed ``write`` leaves nothing behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
