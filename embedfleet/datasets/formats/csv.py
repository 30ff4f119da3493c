"""CSV sources: one document per record of a file with a header row.

Partitioning
------------
One partition per file. Quoted CSV fields may contain newlines (document text often does), so
a CSV cannot be split at byte offsets without misreading rows; use JSONL or Parquet for large
corpora.

Document ids
------------
As for every table (:mod:`~embedfleet.datasets.formats.tables`), with ``n`` the 1-based record
number (a malformed row counts as a record, so the rows after it keep their numbers).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from embedfleet.datasets.formats.common import (
    Estimator,
    Format,
    Rows,
    is_remote,
    plan_repr,
    single_file,
    single_object,
)
from embedfleet.datasets.formats.tables import (
    METADATA_COLUMN,
    check_columns,
    open_table_file,
    record_row,
)
from embedfleet.datasets.source import SourceSpec

__all__ = ["CSV", "CsvFile"]

logger = logging.getLogger(__name__)

# The csv module refuses fields over 128 KiB by default, and a refused field derails the parse
# of the rest of its record. A field is bounded by its file and a text by max-document-bytes
# (checked per row), so the limit is only the most both the csv module (a C long, 32 bits on
# some platforms) and a pyarrow.csv block (int32) can hold.
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class CsvFile:
    path: str
    bytes: int
    # An object's ETag (object-store sources): what an unchanged object is known by on a re-run.
    version: str = field(default="", repr=False)

    __repr__ = plan_repr  # the version joins the resume fingerprint when there is one


def _plan(spec: SourceSpec) -> list[CsvFile]:
    if is_remote(spec):
        rel, size, version = single_object(spec)
        return [CsvFile(path=rel, bytes=size, version=version)]
    files = single_file(spec)
    for rel, size in files:
        if size > 4 * spec.partition_bytes:
            logger.warning(
                "%s (%d bytes) is read as one partition: CSV cannot be split safely; JSONL or Parquet can",
                rel,
                size,
            )
    return [CsvFile(path=rel, bytes=size) for rel, size in files]


def _read(spec: SourceSpec, part: CsvFile) -> pa.Table:
    """A CSV file's records, parsed by the csv module and typed as pyarrow.csv would type them.

    The csv module splits the records: a field of any length (pyarrow's reader fails a file
    with one field longer than its block), and a row with the wrong number of fields is one
    error row, not a failed file. Fields are decoded with ``surrogateescape`` so that invalid
    UTF-8 fails only its own record; the columns besides text, id and metadata are then typed
    by pyarrow's CSV inference, as they always were.
    """
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    records: list[tuple[int, list[str] | str]] = []  # (record number, fields or why not)
    with open_table_file(spec, part.path) as f:
        reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline=""))
        header = next(reader, [])
        while True:
            line = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                records.append((len(records) + 1, f"malformed CSV row at line {line}: {exc}"))
                continue
            if not fields:
                continue  # a blank line: no record, as pyarrow.csv reads it
            if len(fields) != len(header):
                records.append((len(records) + 1, f"malformed CSV row at line {line}: "
                                f"{len(fields)} fields, the header has {len(header)}"))
                continue
            records.append((len(records) + 1, fields))
    check_columns(spec, part.path, pa.schema(
        [pa.field(name, pa.binary() if name == spec.text_column else pa.string()) for name in header]
    ))
    good = [fields for _, fields in records if isinstance(fields, list)]
    typed = _csv_typed_columns(spec, header, good)
    rows = Rows()
    k = 0
    for number, fields in records:
        location = f"{part.path}:{number}"
        if isinstance(fields, str):
            rows.fail(location, fields)
            continue
        record: dict[str, Any] = {}
        for i, name in enumerate(header):
            if name in typed:
                record[name] = typed[name][k]
            elif name == spec.text_column:
                # Its bytes as in the file, so invalid UTF-8 is reported where it is.
                record[name] = fields[i].encode("utf-8", "surrogateescape")
            else:
                record[name] = fields[i]
        k += 1
        record_row(rows, record, location=location, spec=spec)
    return rows.table()


def _csv_typed_columns(spec: SourceSpec, header: list[str], good: list[list[str]]) -> dict[str, list]:
    """The values of the CSV's metadata columns, typed by pyarrow.csv from the good rows."""
    import pyarrow.csv as pacsv

    untyped = {spec.text_column, spec.id_column, METADATA_COLUMN}
    indices = [i for i, name in enumerate(header) if name not in untyped]
    if not indices or not good:
        return {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([header[i] for i in indices])
    writer.writerows([fields[i] for i in indices] for fields in good)
    data = buffer.getvalue().encode("utf-8", "surrogateescape")
    table = pacsv.read_csv(
        pa.BufferReader(data),
        # One block: a row can never straddle two, however long its fields.
        read_options=pacsv.ReadOptions(block_size=min(len(data) + 1, _CSV_FIELD_LIMIT)),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
    )
    return {header[i]: table.column(j).to_pylist() for j, i in enumerate(indices)}


def _estimate(spec: SourceSpec, parts: Sequence[CsvFile], chunks: Estimator) -> int:
    return sum(chunks.unknown_records(part.bytes) for part in parts)


CSV = Format(partition=CsvFile, plan=_plan, read=_read, estimate=_estimate, suffixes=(".csv",))
