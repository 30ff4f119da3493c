"""JSONL (``.jsonl``, ``.ndjson``) sources: one document per JSON object line.

Partitioning
------------
Byte ranges of ``partition_bytes``; a line belongs to the range in which it starts (as
``dask.bytes.read_bytes(delimiter=b"\\n")``). Blank lines are not documents.

Document ids
------------
As for every table (:mod:`~embedfleet.datasets.formats.tables`), with ``n`` the 1-based line
number. Without an id column each partition counts the newlines before its byte range (fast,
but the total work grows with the square of the file size): give an id column for large JSONL
files.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from embedfleet.datasets.formats.common import (
    Estimator,
    Format,
    Rows,
    is_remote,
    json_type,
    plan_repr,
    read_range,
    single_file,
    single_object,
)
from embedfleet.datasets.formats.tables import open_table_file, record_row
from embedfleet.datasets.source import SourceSpec

__all__ = ["JSONL", "ByteRange"]


@dataclass(frozen=True)
class ByteRange:
    """The JSONL lines that *start* in ``[start, start + length)`` of ``path``."""

    path: str
    start: int
    length: int
    # An object's ETag (object-store sources): what an unchanged object is known by on a re-run.
    version: str = field(default="", repr=False)

    __repr__ = plan_repr  # the version joins the resume fingerprint when there is one


def _plan(spec: SourceSpec) -> list[ByteRange]:
    if is_remote(spec):
        rel, size, version = single_object(spec)
    else:
        [(rel, size)] = single_file(spec)
        version = ""
    if size == 0:
        return [ByteRange(path=rel, start=0, length=0, version=version)]
    step = spec.partition_bytes
    return [ByteRange(path=rel, start=start, length=min(step, size - start), version=version)
            for start in range(0, size, step)]


def _read(spec: SourceSpec, part: ByteRange) -> pa.Table:
    end = part.start + part.length
    rows = Rows()
    with open_table_file(spec, part.path) as f:
        if part.start > 0:
            # Finish the line that started before this range: it belongs to the previous one.
            f.seek(part.start - 1)
            f.readline()
        pos = f.tell()
        if is_remote(spec):
            lines = _LineNumbers(functools.partial(read_range, spec, part.path), pos)
        else:
            lines = _LineNumbers(functools.partial(_pread, f.fileno()), pos)
        index = 0
        while pos < end:
            line = f.readline()
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            index += 1
            location = functools.partial(lambda i: f"{part.path}:{lines.number(i)}", index)
            _jsonl_line(rows, line, line_start=line_start, spec=spec, location=location)
    return rows.table()


class _LineNumbers:
    """Line numbers of a byte range's lines, counting the newlines before it only if asked."""

    def __init__(self, read_at: Callable[[int, int], bytes], offset: int):
        self.read_at, self.offset, self.base = read_at, offset, None

    def number(self, index: int) -> int:
        if self.base is None:
            self.base = _newlines_before(self.read_at, self.offset)
        return self.base + index


def _jsonl_line(rows: Rows, line: bytes, *, line_start: int, spec: SourceSpec, location: Callable[[], str]) -> None:
    raw = line.rstrip(b"\n").rstrip(b"\r")
    if line_start == 0 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        return  # blank lines separate nothing in JSONL; they are not documents
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        rows.fail(location(), f"invalid UTF-8 at byte {line_start + exc.start} of the file (byte {exc.start} of the line)")
        return
    try:
        record = json.loads(decoded)
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        col = getattr(exc, "colno", None)
        rows.fail(location(), f"malformed JSON line: {msg}" + (f" at column {col}" if col else ""))
        return
    if not isinstance(record, dict):
        rows.fail(location(), f"line is {json_type(record)}, not a JSON object")
        return
    record_row(rows, record, location=location, spec=spec)


def _pread(fd: int, start: int, end: int) -> bytes:
    return os.pread(fd, end - start, start)


def _newlines_before(read_at: Callable[[int, int], bytes], offset: int) -> int:
    """Newlines in the first ``offset`` bytes of a file, read by ``read_at(start, end)`` (no
    file position moves: a local file's pread, an object's ranged GET)."""
    count = position = 0
    while position < offset:
        block = read_at(position, position + min(offset - position, 8 * 2**20))
        if not block:
            break
        count += block.count(b"\n")
        position += len(block)
    return count


def _estimate(spec: SourceSpec, parts: Sequence[ByteRange], chunks: Estimator) -> int:
    return sum(chunks.unknown_records(part.length) for part in parts)


JSONL = Format(partition=ByteRange, plan=_plan, read=_read, estimate=_estimate,
               suffixes=(".jsonl", ".ndjson"))
