"""The sample bank: synthetic samples of one model on Parquet, a bounded sample store, generation.

Plain pyarrow and torch; the Ray actors that share these across trials live in dfq_search.distributed.
"""

from dfq_search.bank.bank import BankHeader, GeneratorVersion, SampleBank, resolve
from dfq_search.bank.codec import ENCODINGS
from dfq_search.bank.generate import (
    SourceTrainer,
    WorkerConfig,
    check_forks,
    concat,
    generate_into_bank,
    share_warmups,
    warm_start,
    warmup_name,
)
from dfq_search.bank.shard import SCHEMA_VERSION, CorruptShard, Samples, ShardEntry
from dfq_search.bank.store import Batch, SampleStore

__all__ = [
    "ENCODINGS",
    "SCHEMA_VERSION",
    "BankHeader",
    "Batch",
    "CorruptShard",
    "GeneratorVersion",
    "SampleBank",
    "SampleStore",
    "Samples",
    "ShardEntry",
    "SourceTrainer",
    "WorkerConfig",
    "check_forks",
    "concat",
    "generate_into_bank",
    "resolve",
    "share_warmups",
    "warm_start",
    "warmup_name",
]
