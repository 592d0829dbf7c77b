"""The sample bank: Parquet shards of synthetic samples of one model P, on any pyarrow filesystem.

Layout under the bank's root (a local path or any URI ``pyarrow.fs`` resolves, e.g. ``s3://b/k``)::

    bank.json                    header: schema version, P's fingerprint, image shape, encoding
    shards/<id>.parquet          samples (see dfq_search.bank.shard)
    index/<id>.json              the shard's entry: rows, bytes, SHA-256, generator, config hash, steps
    generators/<name>/v<step>.pt published generator weights (+ .json: config, checksum)

The header and the index entries form the manifest. A shard is served only once its entry exists, and
the entry is written after the shard is in place, both atomically: a writer killed at any point leaves
either nothing or a stray ``*.tmp`` / unindexed shard that no reader serves. Every writer names its
shards with a fresh id, so several writers (buffer shards, CLI runs) can extend one bank concurrently.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs
import torch

from dfq_search.bank import codec
from dfq_search.bank.shard import (
    SCHEMA_VERSION,
    CorruptShard,
    Samples,
    ShardEntry,
    parse,
    read_verified,
    shard_bytes,
    write_atomic,
)
from dfq_search.errors import DfqError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankHeader:
    """What every sample in a bank shares: the model it was synthesised for and the storage format."""

    fingerprint: str
    image_shape: tuple[int, int, int]
    num_classes: int
    model: str = ""
    encoding: str = "float16"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        codec.check_encoding(self.encoding)


@dataclass
class GeneratorVersion:
    """One published state of a generator: its name, step, config and where its weights lie."""

    name: str
    step: int
    file: str
    sha256: str
    config_hash: str
    config: dict = field(default_factory=dict)


def resolve(uri: str, fs: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a bank location; a plain path is a local one (made absolute)."""
    if fs is not None:
        return fs, str(uri).rstrip("/")
    text = str(uri)
    if "://" not in text:
        from pathlib import Path

        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    return pafs.FileSystem.from_uri(text)


class SampleBank:
    """A bank at ``uri``; use :meth:`create` to start or extend one, :meth:`open` to read one."""

    def __init__(self, uri: str, header: BankHeader, fs: pafs.FileSystem | None = None) -> None:
        self.uri = str(uri)
        self.fs, self.root = resolve(uri, fs)
        self.header = header

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, uri: str, header: BankHeader, fs: pafs.FileSystem | None = None) -> SampleBank:
        """A new bank, or the existing one at ``uri`` when it was made for the same P and format."""
        filesystem, root = resolve(uri, fs)
        if _exists(filesystem, f"{root}/bank.json"):
            return cls.open(uri, header.fingerprint, fs, expect=header)
        try:
            for sub in ("shards", "index", "generators"):
                filesystem.create_dir(f"{root}/{sub}", recursive=True)
            write_atomic(filesystem, f"{root}/bank.json", json.dumps(asdict(header), indent=1).encode())
        except OSError as err:
            reason = " ".join(str(err.strerror or err).split())
            raise DfqError("cannot create a sample bank there", uri, f"a writable location ({reason})",
                           "pass --bank DIR where you can write") from None  # fmt: skip
        return cls(uri, header, fs)

    @classmethod
    def open(
        cls, uri: str, fingerprint: str | None = None, fs: pafs.FileSystem | None = None,
        expect: BankHeader | None = None,
    ) -> SampleBank:  # fmt: skip
        """The bank at ``uri``; refused when it was made for another model than ``fingerprint``."""
        filesystem, root = resolve(uri, fs)
        if not _exists(filesystem, f"{root}/bank.json"):
            raise DfqError("no sample bank", uri, "a folder with bank.json", "run 'dfq-search generate'")
        with filesystem.open_input_file(f"{root}/bank.json") as f:
            header = BankHeader(**json.loads(f.readall()))
        if header.schema_version != SCHEMA_VERSION:
            raise DfqError("bank schema version", header.schema_version, f"version {SCHEMA_VERSION}",
                           "regenerate the bank with this version")  # fmt: skip
        if fingerprint is not None and header.fingerprint != fingerprint:
            raise DfqError("the bank was made for another model (fingerprint mismatch)", header.fingerprint,
                           f"fingerprint {fingerprint} of the model given",
                           "pass the model the bank was generated for, or use a new bank path")  # fmt: skip
        if expect is not None and expect != header:
            raise DfqError("the bank's format differs", asdict(header), f"{asdict(expect)}",
                           "use a new bank path or the same encoding and model")  # fmt: skip
        return cls(uri, header, fs)

    # --- samples ---------------------------------------------------------------------------------
    def write_shard(
        self, samples: Samples, config_hash: str = "", compression: str | None = None, writer: str = ""
    ) -> ShardEntry:
        """Commit ``samples`` as one shard (atomic), then its index entry (atomic); ``writer`` is
        recorded in the entry (a buffer shard rebuilt after a crash reloads what it wrote)."""
        if tuple(samples.x.shape[1:]) != self.header.image_shape:
            raise DfqError("sample shape", tuple(samples.x.shape[1:]), f"{self.header.image_shape}",
                           "write samples of the bank's model")  # fmt: skip
        meta = {"fingerprint": self.header.fingerprint, "config_hash": config_hash}
        data = shard_bytes(samples, meta, self.header.encoding, compression)
        sid = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        steps = samples.step.tolist() or [0]
        entry = ShardEntry(f"shards/{sid}.parquet", len(samples), len(data), hashlib.sha256(data).hexdigest(),
                           samples.generator, config_hash, min(steps), max(steps), writer)  # fmt: skip
        write_atomic(self.fs, f"{self.root}/{entry.file}", data)
        write_atomic(self.fs, f"{self.root}/index/{sid}.json", json.dumps(asdict(entry)).encode())
        return entry

    def entries(self) -> list[ShardEntry]:
        """The committed shards, oldest first (ids start with their creation time in ns)."""
        sel = pafs.FileSelector(f"{self.root}/index", allow_not_found=True)
        infos = sorted(
            (i for i in self.fs.get_file_info(sel) if i.path.endswith(".json")), key=lambda i: i.path
        )
        out = []
        for info in infos:
            with self.fs.open_input_file(info.path) as f:
                out.append(ShardEntry(**json.loads(f.readall())))
        return out

    def read(self, entry: ShardEntry) -> Samples:
        """The samples of one shard, verified; :class:`CorruptShard` when its bytes are damaged."""
        samples, meta = parse(read_verified(self.fs, f"{self.root}/{entry.file}", entry))
        if meta.get("fingerprint") != self.header.fingerprint:
            raise CorruptShard("shard of another model in the bank", entry.file,
                               f"fingerprint {self.header.fingerprint}", "remove the shard")  # fmt: skip
        return samples

    def iter_samples(self, max_samples: int | None = None) -> Iterator[Samples]:
        """Every intact shard's samples (damaged shards are logged and skipped), up to ``max_samples``."""
        total = 0
        for entry in self.entries():
            if max_samples is not None and total >= max_samples:
                return
            try:
                samples = self.read(entry)
            except CorruptShard as err:
                log.warning("skipping a damaged shard: %s", err)
                continue
            total += len(samples)
            yield samples

    # --- generator weights -----------------------------------------------------------------------
    def publish_generator(
        self, name: str, step: int, state: dict, config: dict, config_hash: str
    ) -> GeneratorVersion:
        """Save a generator's state under ``generators/<name>/v<step>``: weights first, then its entry."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        base = f"generators/{name}/v{step:08d}"
        self.fs.create_dir(f"{self.root}/generators/{name}", recursive=True)
        version = GeneratorVersion(
            name, step, f"{base}.pt", hashlib.sha256(data).hexdigest(), config_hash, config
        )
        write_atomic(self.fs, f"{self.root}/{version.file}", data)
        write_atomic(self.fs, f"{self.root}/{base}.json", json.dumps(asdict(version)).encode())
        return version

    def generator_versions(self, name: str | None = None) -> list[GeneratorVersion]:
        """Published versions, of one generator or all, ordered by name then step."""
        sel = pafs.FileSelector(f"{self.root}/generators", recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.path.endswith(".json"):
                with self.fs.open_input_file(info.path) as f:
                    v = GeneratorVersion(**json.loads(f.readall()))
                if name is None or v.name == name:
                    out.append(v)
        return sorted(out, key=lambda v: (v.name, v.step))

    def load_generator(self, version: GeneratorVersion) -> dict:
        """The state published as ``version`` (checksum verified)."""
        path = f"{self.root}/{version.file}"
        entry = ShardEntry(version.file, 0, _size(self.fs, path), version.sha256, version.name, "", 0, 0)
        return torch.load(io.BytesIO(read_verified(self.fs, path, entry)), weights_only=True)

    def info(self) -> dict:
        """A summary: header, shard and sample counts per generator, bytes, published versions."""
        per_gen: dict[str, int] = {}
        entries = self.entries()
        for e in entries:
            per_gen[e.generator] = per_gen.get(e.generator, 0) + e.rows
        versions = {v.name: v.step for v in self.generator_versions()}
        return {"uri": self.uri, **asdict(self.header), "shards": len(entries),
                "samples": sum(e.rows for e in entries), "bytes": sum(e.bytes for e in entries),
                "samples_per_generator": per_gen, "latest_generator_steps": versions}  # fmt: skip


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _size(fs: pafs.FileSystem, path: str) -> int:
    info = fs.get_file_info(path)
    return -1 if info.type == pafs.FileType.NotFound else int(info.size)
