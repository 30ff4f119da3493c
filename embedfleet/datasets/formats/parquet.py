"""Parquet sources: a .parquet file, or a folder of them; one document per row.

Partitioning
------------
Consecutive row groups (from the footers), grouped into about ``partition_bytes`` of compressed
data. Sidecars (``_SUCCESS``, ``_metadata``) are ignored; a subfolder that cannot be listed is
planned as a folder source's would be (a :class:`FileGroup` read as one error row).

Document ids
------------
As for every table (:mod:`~embedfleet.datasets.formats.tables`), with ``n`` the 1-based row
number in its file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from embedfleet.datasets.formats.common import (
    Estimator,
    Format,
    Rows,
    is_remote,
    list_objects,
    plan_repr,
    single_file,
    single_object,
)
from embedfleet.datasets.formats.files import FileGroup
from embedfleet.datasets.formats.listing import (
    is_data_sidecar,
    is_unlisted,
    list_files,
    suffix_of,
)
from embedfleet.datasets.formats.tables import (
    check_columns,
    open_table_file,
    record_row,
)
from embedfleet.datasets.source import SourceSpec
from embedfleet.errors import SourceError

__all__ = ["PARQUET", "ParquetPiece", "ParquetPieces"]


@dataclass(frozen=True)
class ParquetPiece:
    path: str
    row_group: int
    first_row: int  # 0-based index of the row group's first row in its file
    rows: int
    # Its object's ETag (object-store sources): what an unchanged object is known by on a re-run.
    version: str = field(default="", repr=False)

    __repr__ = plan_repr  # the version joins the resume fingerprint when there is one


@dataclass(frozen=True)
class ParquetPieces:
    pieces: tuple[ParquetPiece, ...]
    bytes: int  # compressed bytes on disk, as _plan counts them
    text_bytes: int  # uncompressed bytes of the text column


def _parquet_files(spec: SourceSpec) -> list[tuple[str, int]] | list[tuple[str, int, str]]:
    if is_remote(spec):
        if not spec.location.endswith("/"):
            return [single_object(spec)]
        objects = [o for o in list_objects(spec) if suffix_of(o[0]) == ".parquet" and not is_data_sidecar(o[0])]
        if not objects:
            raise SourceError(f"folder {spec.location} has no .parquet files")
        return objects
    location = Path(spec.location)
    if not location.is_dir():
        return single_file(spec)
    files = [
        (rel, size) for rel, size in list_files(location)
        if is_unlisted(rel) or (suffix_of(rel) == ".parquet" and not is_data_sidecar(rel))
    ]
    if not files:
        raise SourceError(f"folder {location} has no .parquet files")
    return files


def _plan(spec: SourceSpec) -> list[ParquetPieces | FileGroup]:
    import pyarrow.parquet as pq

    groups: list[ParquetPieces | FileGroup] = []
    current: list[ParquetPiece] = []
    size = text_size = 0

    def flush() -> None:
        nonlocal current, size, text_size
        if current:
            groups.append(ParquetPieces(pieces=tuple(current), bytes=size, text_bytes=text_size))
        current, size, text_size = [], 0, 0

    unlisted: list[tuple[str, int]] = []
    # The loop's ``size`` replaces the running total with each file's own size: a file's first
    # partition counts the whole file too, and one still open when the next file starts reports
    # that file's size. Kept: the grouping and sizes are in every Parquet plan, and a plan's
    # repr is the fingerprint a job resumes by (tests/test_formats.py pins it).
    for rel, size, *version in _parquet_files(spec):
        if is_unlisted(rel):
            unlisted.append((rel, size))
            continue
        try:
            with open_table_file(spec, rel) as f:
                metadata = pq.read_metadata(f)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{rel}: not a readable Parquet file ({exc})") from exc
        check_columns(spec, rel, metadata.schema.to_arrow_schema())
        first_row = 0
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            compressed = text = 0
            for c in range(group.num_columns):
                column = group.column(c)
                compressed += column.total_compressed_size
                if column.path_in_schema == spec.text_column:
                    text += column.total_uncompressed_size
            if current and size + compressed > spec.partition_bytes:
                flush()
            current.append(ParquetPiece(path=rel, row_group=index, first_row=first_row, rows=group.num_rows,
                                        version=version[0] if version else ""))
            size += compressed
            text_size += text
            first_row += group.num_rows
    flush()
    if unlisted:
        # Read as a folder source's would be: one error row each, whatever the source's kind.
        groups.append(FileGroup(files=tuple(unlisted)))
    # A source without a single row group still has one (empty) partition, like an empty JSONL file.
    return groups or [ParquetPieces(pieces=(), bytes=0, text_bytes=0)]


def _read(spec: SourceSpec, part: ParquetPieces) -> pa.Table:
    import pyarrow.parquet as pq

    rows = Rows()
    files: dict[str, Any] = {}
    with contextlib.ExitStack() as opened:
        for piece in part.pieces:
            if piece.path not in files:
                files[piece.path] = pq.ParquetFile(opened.enter_context(open_table_file(spec, piece.path)))
                check_columns(spec, piece.path, files[piece.path].schema_arrow)
            table = files[piece.path].read_row_group(piece.row_group)
            for k, record in enumerate(table.to_pylist()):
                record_row(rows, record, location=f"{piece.path}:{piece.first_row + k + 1}", spec=spec)
    return rows.table()


def _estimate(spec: SourceSpec, parts: Sequence[ParquetPieces], chunks: Estimator) -> int:
    return sum(chunks.stream(part.text_bytes, sum(p.rows for p in part.pieces)) for part in parts)


PARQUET = Format(partition=ParquetPieces, plan=_plan, read=_read, estimate=_estimate,
                 suffixes=(".parquet",))
