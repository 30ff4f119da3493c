"""Sources and their readers: folders, JSONL/CSV/Parquet files and built-in datasets.

``source_spec`` -> ``plan_partitions`` (driver, cheap) -> ``read_partition`` (workers), or
``read_documents`` for the whole documents frame as a dask DataFrame.
"""

from __future__ import annotations

from embedfleet.datasets.builtin import BuiltinDataset, get_builtin, known_builtins, register_builtin
from embedfleet.datasets.readers import (
    BuiltinPart,
    ByteRange,
    CsvFile,
    FileGroup,
    ParquetPiece,
    ParquetPieces,
    Partition,
    estimate_chunks,
    plan_partitions,
    read_documents,
    read_partition,
    source_spec,
)
from embedfleet.datasets.source import SourceKind, SourceSpec

__all__ = [
    "SourceSpec",
    "SourceKind",
    "source_spec",
    "plan_partitions",
    "read_partition",
    "read_documents",
    "estimate_chunks",
    "Partition",
    "FileGroup",
    "ByteRange",
    "CsvFile",
    "ParquetPiece",
    "ParquetPieces",
    "BuiltinPart",
    "BuiltinDataset",
    "register_builtin",
    "get_builtin",
    "known_builtins",
]
