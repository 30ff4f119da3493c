"""Folder sources (and a single text file): one document per file, HTML reduced to its text.

Partitioning
------------
Files sorted by relative path, grouped greedily into about ``partition_bytes`` (each file also
weighs 4 KiB, so a partition never holds more than a few thousand tiny files).

Document ids
------------
The path relative to the source root, POSIX separators (a single file: its name); a folder
that cannot be listed: its relative path and ``/``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from embedfleet.datasets.formats.common import (
    Estimator,
    Format,
    Refused,
    Rows,
    check_metadata,
    check_text,
    dumps,
    file_size,
    is_remote,
    list_objects,
    open_checked,
    single_file,
    single_object,
    source_root,
    too_big,
)
from embedfleet.datasets.formats.html import (
    HEADINGS_KEY,
    declared_html_decode,
    html_to_text,
)
from embedfleet.datasets.formats.listing import is_unlisted, list_files, suffix_of
from embedfleet.datasets.source import SourceSpec
from embedfleet.errors import SourceError

__all__ = ["FILES", "FileGroup"]

_HTML_SUFFIXES = (".html", ".htm")
# Each file costs an open/stat/read beyond its bytes; this keeps partitions of tiny files small.
_FILE_WEIGHT = 4096
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class FileGroup:
    """Files of a folder source, by path relative to its root, with their planned sizes.

    An object-store source's entries also hold each object's version (ETag), so a plan shows
    when an object was rewritten, and an unchanged partition is recognised without reading it.
    """

    files: tuple[tuple[str, int] | tuple[str, int, str], ...]


def _plan(spec: SourceSpec) -> list[FileGroup]:
    if is_remote(spec):
        files: list = _remote_files(spec)
    else:
        files = _local_files(spec)
    groups: list[FileGroup] = []
    current: list = []
    weight = 0
    for entry in files:
        # A file over the limit is not read (it becomes an error row), so it weighs little.
        w = min(entry[1], spec.max_document_bytes + 1) + _FILE_WEIGHT
        if current and weight + w > spec.partition_bytes:
            groups.append(FileGroup(files=tuple(current)))
            current, weight = [], 0
        current.append(entry)
        weight += w
    if current:
        groups.append(FileGroup(files=tuple(current)))
    return groups


def _remote_files(spec: SourceSpec) -> list[tuple[str, int, str]]:
    if not spec.location.endswith("/"):
        return [single_object(spec)]
    files = [entry for entry in list_objects(spec) if suffix_of(entry[0]) in spec.extensions]
    if not files:
        raise SourceError(f"folder {spec.location} has no files ending in {', '.join(spec.extensions)}")
    return files


def _local_files(spec: SourceSpec) -> list[tuple[str, int]]:
    location = Path(spec.location)
    if location.is_dir():
        files = [
            (rel, size) for rel, size in list_files(location) if is_unlisted(rel) or suffix_of(rel) in spec.extensions
        ]
        if not files:
            raise SourceError(f"folder {location} has no files ending in {', '.join(spec.extensions)}")
    else:
        files = single_file(spec)
    return files


def _read(spec: SourceSpec, part: FileGroup) -> pa.Table:
    root = source_root(spec)
    rows = Rows()
    for rel, *_ in part.files:
        _read_file(rows, root / rel, rel, spec)
    return rows.table()


def _read_file(rows: Rows, path: Path | Any, rel: str, spec: SourceSpec) -> None:
    if is_unlisted(rel):
        rows.fail(rel, _unlisted_reason(path))
        return
    extension = suffix_of(rel)
    meta: dict[str, Any] = {"source": rel, "extension": extension}
    limit = spec.max_document_bytes
    try:
        f = open_checked(spec, path)
    except (FileNotFoundError, NotADirectoryError):
        rows.fail(rel, "file not found (removed after the source was planned)", dumps(meta))
        return
    except Refused as exc:
        rows.fail(rel, str(exc), dumps(meta))
        return
    with f:
        size = file_size(f)
        meta["bytes"] = size
        if size > limit:
            rows.fail(rel, too_big(size, limit), dumps(meta))
            return
        # The file may grow between the stat and the read: never read past the limit.
        data = f.read(limit + 1)
    meta["bytes"] = len(data)
    if len(data) > limit:
        rows.fail(rel, too_big(len(data), limit), dumps(meta))
        return
    nul = data.find(b"\x00")
    if nul >= 0:
        hint = " (UTF-16 text? only UTF-8 is read)" if data.startswith(_UTF16_BOMS) else ""
        rows.fail(rel, f"binary file (NUL byte at offset {nul}){hint}", dumps(meta))
        return
    html = extension in _HTML_SUFFIXES
    try:
        # A BOM is an encoding marker, not text; everything else is kept exactly.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = declared_html_decode(data) if html else None
        if text is None:
            rows.fail(rel, f"invalid UTF-8 at byte {exc.start} ({exc.reason}: {data[exc.start:exc.start + 4]!r})", dumps(meta))
            return
    headings = None
    if html:
        text, title, headings = html_to_text(text)
        if title:
            meta["title"] = title
        if not text.strip():
            rows.fail(rel, "HTML page has no visible text", dumps(meta))
            return
    metadata = dumps(meta)
    if headings:
        # Where the page's headings are, for the chunker; a page with too many to carry
        # is read without them.
        with_headings = dumps({**meta, HEADINGS_KEY: headings})
        if check_metadata(with_headings, meta, spec.max_metadata_bytes) is None:
            metadata = with_headings
    # The metadata too: a page's title can be any length.
    problem = check_text(text, limit) or check_metadata(metadata, meta, spec.max_metadata_bytes)
    if problem:
        rows.fail(rel, problem, metadata)
        return
    rows.ok(rel, text, metadata)


def _unlisted_reason(path: Path) -> str:
    try:
        with os.scandir(path):
            pass
    except OSError as exc:
        return f"cannot list the folder: {exc.strerror or exc}"
    return "cannot list the folder (it could not be listed when the source was planned)"


def _estimate(spec: SourceSpec, parts: Sequence[FileGroup], chunks: Estimator) -> int:
    # Files over the size limit are never read: they give no chunks.
    return sum(chunks.document(n) for part in parts for _, n, *_ in part.files if n <= spec.max_document_bytes)


FILES = Format(partition=FileGroup, plan=_plan, read=_read, estimate=_estimate)
