"""One Parquet shard of labelled synthetic samples, and its atomic write and verified read.

Columns: ``label`` int16, ``step`` int32 (the generator's step), ``pixels`` fixed-size binary (the
encoded image, see :mod:`dfq_search.bank.codec`) and, when given, ``logits`` fixed-size binary (P's
float32 logits, so a trial need not run P again). The file's key-value metadata carries the schema
version, P's fingerprint, the generator's name and config hash, the image shape and the encoding.

A shard is written to a temporary name and moved into place (a rename on a local disk; a whole-object
put on object storage), and its entry records the byte count and SHA-256 of the file: a reader checks
both before parsing, so a truncated or corrupted shard is refused, never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import Tensor

from dfq_search.bank import codec
from dfq_search.errors import DfqError

SCHEMA_VERSION = 1
META_KEY = b"dfq_search.shard"


class CorruptShard(DfqError):
    """A shard whose bytes do not match its entry (truncated, overwritten or half-written)."""


@dataclass(frozen=True)
class ShardEntry:
    """What the bank's index knows about one committed shard."""

    file: str
    rows: int
    bytes: int
    sha256: str
    generator: str
    config_hash: str
    first_step: int
    last_step: int
    writer: str = ""  # who committed it: "<buffer run id>/<shard index>" for a sample buffer's shard


@dataclass
class Samples:
    """Labelled samples: ``x`` [N, C, H, W], ``y`` int64 [N], ``step`` int64 [N], ``logits`` or None."""

    x: Tensor
    y: Tensor
    step: Tensor
    logits: Tensor | None = None
    generator: str = ""

    def __len__(self) -> int:
        return len(self.y)


def _binary_column(rows: np.ndarray) -> pa.Array:
    rows = np.ascontiguousarray(rows)
    width = rows.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, pa.py_buffer(rows)])


def _binary_rows(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    width = arr.type.byte_width
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
    return data[arr.offset * width : (arr.offset + len(arr)) * width].reshape(len(arr), width)


def shard_bytes(samples: Samples, meta: dict, encoding: str, compression: str | None = None) -> bytes:
    """The Parquet file of ``samples`` as bytes; ``meta`` goes into the footer with the value range."""
    raw, value_range = codec.encode(samples.x, encoding)
    cols = {
        "label": pa.array(samples.y.cpu().numpy().astype(np.int16)),
        "step": pa.array(samples.step.cpu().numpy().astype(np.int32)),
        "pixels": _binary_column(raw),
    }
    if samples.logits is not None:
        logits = samples.logits.detach().to("cpu", torch.float32).contiguous()
        cols["logits"] = _binary_column(logits.view(torch.uint8).numpy())
    full = {**meta, "schema_version": SCHEMA_VERSION, "encoding": encoding, "value_range": value_range,
            "image_shape": list(samples.x.shape[1:]), "generator": samples.generator}  # fmt: skip
    table = pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(full).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression or "none")
    return sink.getvalue().to_pybytes()


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then move it into place."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(path)


def read_verified(fs: pafs.FileSystem, path: str, entry: ShardEntry) -> bytes:
    """The shard's bytes, or :class:`CorruptShard` when their size or SHA-256 differ from the entry."""
    try:
        with fs.open_input_file(path) as f:
            data = f.readall()
    except (FileNotFoundError, OSError) as err:
        raise CorruptShard("shard file unreadable", path, f"a readable file ({err})",
                           "restore it or remove its index entry") from err  # fmt: skip
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CorruptShard("shard checksum mismatch (truncated or corrupted)", path,
                           f"{entry.bytes} bytes with sha256 {entry.sha256[:12]}...",
                           "delete the shard and its index entry, or regenerate the bank")  # fmt: skip
    return data


def parse(data: bytes) -> tuple[Samples, dict]:
    """(samples, footer metadata) of a verified shard; ``x`` float16 for float16 shards."""
    table = pq.read_table(pa.BufferReader(data))
    meta = json.loads(table.schema.metadata[META_KEY])
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DfqError("shard schema version", meta.get("schema_version"), f"version {SCHEMA_VERSION}",
                       "regenerate the bank with this version of dfq_search")  # fmt: skip
    shape = tuple(meta["image_shape"])
    x = codec.decode(_binary_rows(table["pixels"]), shape, meta["encoding"], meta["value_range"])
    logits = None
    if "logits" in table.column_names:
        logits = torch.from_numpy(_binary_rows(table["logits"]).copy()).view(torch.float32)
    y = torch.from_numpy(table["label"].to_numpy().astype(np.int64))
    step = torch.from_numpy(table["step"].to_numpy().astype(np.int64))
    return Samples(x, y, step, logits, meta.get("generator", "")), meta
