"""Where a campaign lives: a folder, or a URI that ``pyarrow.fs`` opens (``s3://bucket/prefix``,
``gs://...``, ``file:///abs/path``): what a cluster without a shared file system uses.

With a folder, everything is read and written there. With a URI, Tune writes the trials there itself
(each worker uploads its results and checkpoints), and the driver works in a local mirror of the
campaign (under the cache): it pulls the campaign before a resume and the trials after them (not
the sample bank: it is read at the URI), and pushes its own files (``DRIVER_FILES``) after each step
that writes them. Trials' memos of finished
configs stay on each node (a repeated config is replayed only on the node that ran it).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dfq_search.cache import cache_dir
from dfq_search.errors import DfqError

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
DRIVER_FILES = (
    "campaign.json",
    "sensitivity.json",
    "act_sensitivity.json",
    "hessian.json",
    "results.parquet",
    "pareto.png",
    "best_plan.yaml",
    "best_model.pt",
    "best_model.onnx",
    "summary.json",
    "tensorboard",
    "refine",
)
CHECKPOINT = "checkpoint_"  # Tune's checkpoint folders in a trial's folder: fetched when read
NOT_PULLED = ("bank",)  # the sample bank is read where it is (SampleBank opens URIs): never copied


def is_uri(location: str | Path) -> bool:
    return bool(URI.match(str(location)))


@dataclass(frozen=True)
class CampaignStore:
    """A campaign's folder (``local``) and, for URI storage, the URI it mirrors (``uri``)."""

    local: Path
    uri: str | None = None

    @classmethod
    def at(cls, storage: str | Path, name: str) -> CampaignStore:
        """The campaign ``name`` under ``storage`` (a folder or a URI)."""
        if not is_uri(storage):
            return cls((Path(storage) / name).resolve())
        uri = f"{str(storage).rstrip('/')}/{name}"
        key = hashlib.sha256(uri.encode()).hexdigest()[:12]
        return cls(cache_dir() / "campaigns" / key / name, uri)

    @classmethod
    def of(cls, location: str | Path) -> CampaignStore:
        """The campaign whose own folder or URI is ``location`` (``<storage>/<name>``)."""
        if not is_uri(location):
            return cls(Path(location).resolve())
        parent, _, name = str(location).rstrip("/").rpartition("/")
        return cls.at(parent, name)

    @property
    def where(self) -> str:
        """Where the campaign is kept, as the user names it."""
        return self.uri or str(self.local)

    @property
    def tune_storage(self) -> str:
        """Tune's ``storage_path``: the parent of the campaign."""
        return self.uri.rpartition("/")[0] if self.uri else str(self.local.parent)

    def location(self, sub: str) -> str:
        """``sub`` of the campaign, as a path or URI every node can reach (e.g. the sample bank)."""
        return f"{self.uri}/{sub}" if self.uri else str(self.local / sub)

    def exists(self) -> bool:
        """Whether a campaign was started here (its campaign.json is written before any trial)."""
        if self.uri is None:
            return (self.local / "campaign.json").is_file()
        import pyarrow.fs as pafs

        fs, path = self._fs()
        return self._call(lambda: fs.get_file_info(f"{path}/campaign.json").type == pafs.FileType.File)

    def check_remote(self) -> None:
        """Refuse, before any compute, a URI that cannot be opened or written."""
        if self.uri is None:
            return
        fs, path = self._fs()
        parent, _, name = path.rpartition("/")
        probe = f"{parent}/.write_probe-{name}"  # beside the campaign: a refused run leaves no folder

        def write() -> None:
            fs.create_dir(parent, recursive=True)
            with fs.open_output_stream(probe) as out:
                out.write(b"ok")
            fs.delete_file(probe)

        self._call(write)

    def reset(self) -> None:
        """Empty the mirror (a new campaign at the URI: nothing of an older one may leak into it)."""
        if self.uri is not None:
            shutil.rmtree(self.local, ignore_errors=True)

    def pull(self) -> None:
        """Copy the campaign from the URI into the mirror, without the trials' checkpoints (``fetch``
        brings those that are read); the driver's own files already in the mirror are kept (it wrote
        them: they are at least as new)."""
        if self.uri is None:
            return
        self.local.mkdir(parents=True, exist_ok=True)
        import pyarrow.fs as pafs

        fs, path = self._fs()
        local = pafs.LocalFileSystem()

        def copy() -> None:
            for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True)):
                rel = info.path[len(path) :].strip("/")
                top, *rest = rel.split("/")
                kept = top in DRIVER_FILES and (self.local / top).exists()
                checkpoint = any(part.startswith(CHECKPOINT) for part in rest)
                if info.type != pafs.FileType.File or kept or top in NOT_PULLED or checkpoint:
                    continue
                self._copy(info.path, str(self.local / rel), fs, local, info)

        self._call(copy)

    def fetch(self, folder: Path) -> None:
        """Bring ``folder`` of the mirror (e.g. a trial's checkpoint) from the URI when it is missing."""
        if self.uri is None or folder.exists():
            return
        import pyarrow.fs as pafs

        fs, path = self._fs()
        rel = folder.resolve().relative_to(self.local.resolve()).as_posix()
        info = self._call(lambda: fs.get_file_info(f"{path}/{rel}"))
        if info.type != pafs.FileType.NotFound:
            self._call(lambda: self._copy(info.path, str(folder), fs, pafs.LocalFileSystem(), info))

    def push(self) -> None:
        """Copy the driver's files from the mirror to the URI (replacing what is there)."""
        if self.uri is None:
            return
        import pyarrow.fs as pafs

        fs, path = self._fs()
        local = pafs.LocalFileSystem()

        def copy() -> None:
            fs.create_dir(path, recursive=True)
            for name in DRIVER_FILES:
                info = local.get_file_info(str(self.local / name))
                if info.type != pafs.FileType.NotFound:
                    self._copy(info.path, f"{path}/{name}", local, fs, info)

        self._call(copy)

    @staticmethod
    def _copy(src: str, dst: str, src_fs, dst_fs, info) -> None:
        import pyarrow.fs as pafs

        if info.type == pafs.FileType.Directory:
            dst_fs.create_dir(dst, recursive=True)
        else:
            dst_fs.create_dir(dst.rpartition("/")[0], recursive=True)
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)

    def _fs(self):
        """The URI's file system and path, opened once per store (for s3 opening asks the bucket's region)."""
        return self._opened

    @cached_property
    def _opened(self):
        import pyarrow.fs as pafs

        try:
            return pafs.FileSystem.from_uri(self.uri)
        except OSError as err:
            raise self._unreachable(err) from None
        except ValueError as err:  # ArrowInvalid: an unknown scheme or a malformed URI
            raise DfqError(
                "storage URI not understood",
                self.uri,
                "a folder, or a URI pyarrow.fs opens (s3://bucket/prefix, gs://bucket/prefix, file:///path)",
                f"check the URI ({err})",
            ) from None

    def _call(self, action):
        try:
            return action()
        except OSError as err:
            raise self._unreachable(err) from None

    def _unreachable(self, err: OSError) -> DfqError:
        return DfqError(
            "storage URI not reachable or not writable",
            self.uri,
            f"a URI this machine can read and write ({err})",
            "check the bucket, the credentials (e.g. AWS_PROFILE or an instance role) and the region",
        )
