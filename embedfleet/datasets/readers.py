"""Readers: a source (folder, file, JSONL/CSV/Parquet, built-in dataset) -> the documents frame.

Three steps, split between the driver and the workers:

* :func:`source_spec` (driver) decides what the source is and freezes the options.
* :func:`plan_partitions` (driver) lists files and their sizes, or Parquet footers, and never
  reads a document. The plan is a list of small frozen, picklable descriptors and depends only
  on the source and the spec: the same source gives the same plan, which is what lets a job
  resume partition by partition.
* :func:`read_partition` (worker) reads one descriptor into a ``DOCUMENTS`` table. It is pure:
  no dask.config, only the spec and the descriptor.

A document that cannot be read is not an exception: it becomes a row with ``text=None`` and the
reason in ``error``, and the pipeline skips or fails on it (``embedfleet.on-error``). What is
wrong with the source *as a whole* (missing path, a CSV without the text column) raises
:class:`~embedfleet.errors.SourceError`.

What exists but cannot be read is reported, never left out of the listing (a sync deletes the
vectors of documents that are gone, so one silently missing would lose its vectors):

* a folder that cannot be listed is planned as ``"<path>/"`` and read as one error row with that
  doc_id ("cannot list the folder: Permission denied"): every document under that prefix is
  unknown, not gone. A source folder that cannot be listed at all raises SourceError.
* a symlink loop, a dangling symlink, an unreadable file: an error row with the file's doc_id.
* for tables (JSONL, CSV, Parquet) a file that cannot be read raises SourceError: its records
  cannot be listed, so no row could stand for them. A bad record or CSV row is an error row.

Where files really are
----------------------
Every reader checks the real path of the file it has opened (``/proc/self/fd``, so a symlink
swapped in after the open changes nothing), on the worker, when it reads: a file of a folder
source must lie inside the source folder, and any file inside one of ``SourceSpec.allowed_roots``
when those are given. A document that resolves outside is an error row ("resolves to /x, outside
the allowed roots"); a table file, a SourceError. Planning refuses a source folder whose own real
path changed since the spec was built (a folder replaced by a symlink), and a source outside the
allowed roots.

Partitioning
------------
* folders: files sorted by relative path, grouped greedily into about ``partition_bytes``
  (each file also weighs 4 KiB, so a partition never holds more than a few thousand tiny files).
* JSONL: byte ranges of ``partition_bytes``; a line belongs to the range in which it starts
  (as ``dask.bytes.read_bytes(delimiter=b"\\n")``).
* CSV: one partition per file. Quoted CSV fields may contain newlines (document text often
  does), so a CSV cannot be split at byte offsets without misreading rows; use JSONL or
  Parquet for large corpora.
* Parquet: consecutive row groups (from the footers), grouped into about ``partition_bytes``
  of compressed data.
* built-in: the dataset's documents, sorted by key, in a few partitions.

Document ids
------------
Folder files: the path relative to the source root, POSIX separators (a single file: its name);
a folder that cannot be listed: its relative path and ``/``.
Tables: the id column if one is given, else ``<file>:<n>``, where ``n`` is the 1-based line
number in a JSONL file and the 1-based record number in CSV and Parquet (a malformed CSV row
counts as a record, so the rows after it keep their numbers). Without an id column
each JSONL partition counts the newlines before its byte range (fast, but the total work grows
with the square of the file size): give an id column for large JSONL files, and for stable
ids across edits in any case.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as _dt
import decimal
import errno
import functools
import io
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import pyarrow as pa

from embedfleet import config
from embedfleet.config import ChunkSpec
from embedfleet.datasets.builtin import get_builtin, known_builtins
from embedfleet.datasets.source import SourceSpec
from embedfleet.errors import ConfigError, SourceError
from embedfleet.frames.schemas import DOCUMENTS, check_schema

__all__ = [
    "source_spec",
    "real_roots",
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
]

logger = logging.getLogger(__name__)

_TABLE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_HTML_SUFFIXES = (".html", ".htm")
_DEFAULT_TEXT_COLUMN = "text"
_METADATA_COLUMN = "metadata"
_MAX_DOC_KEY = "embedfleet.read.max-document-bytes"
_MAX_META_KEY = "embedfleet.read.max-metadata-bytes"
# The csv module refuses fields over 128 KiB by default, and a refused field derails the parse
# of the rest of its record. A field is bounded by its file and a text by max-document-bytes
# (checked per row), so the limit is only the most both the csv module (a C long, 32 bits on
# some platforms) and a pyarrow.csv block (int32) can hold.
_CSV_FIELD_LIMIT = 2**31 - 1
# Each file costs an open/stat/read beyond its bytes; this keeps partitions of tiny files small.
_FILE_WEIGHT = 4096
# Built-in datasets are small; a few partitions still exercise the cluster.
_BUILTIN_PARTITIONS = 4
# JSONL/CSV record count is unknown without reading; estimate_chunks assumes this many bytes
# per record (each record gives at least one chunk).
_ASSUMED_RECORD_BYTES = 1024
_CHARS_PER_UNIT = {"tokens": 4, "words": 6, "chars": 1}
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


# --------------------------------------------------------------------------- source_spec


def _accepted(extensions: Sequence[str]) -> str:
    return (
        f"accepted sources: a folder (of files ending in {', '.join(extensions)}, or only of .parquet files), "
        f"a single such file, a .jsonl/.ndjson, .csv or .parquet file, "
        f"or a built-in dataset ({', '.join(known_builtins())}; also written builtin:NAME)"
    )


def _normalise_extensions(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    out: list[str] = []
    for ext in value or ():
        ext = str(ext).strip().lower()
        ext = ext if ext.startswith(".") else "." + ext
        if ext not in out:
            out.append(ext)
    if not out:
        raise ConfigError("the list of file extensions to read is empty (embedfleet.read.extensions)")
    return tuple(out)


def _size_option(value: int | str | None, key: str) -> int:
    if value is None:
        size = config.bytes_value(key)
    else:
        from dask.utils import parse_bytes

        try:
            size = int(parse_bytes(value)) if isinstance(value, str) else int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: {value!r} is not a size (e.g. 16MiB)") from exc
    if size < 1:
        raise ConfigError(f"embedfleet.{key} must be at least 1 byte, not {size}")
    return size


def source_spec(
    source: str | os.PathLike,
    *,
    text_column: str | None = None,
    id_column: str | None = None,
    extensions: Sequence[str] | str | None = None,
    max_document_bytes: int | str | None = None,
    partition_bytes: int | str | None = None,
    max_metadata_bytes: int | str | None = None,
    allowed_roots: Sequence[str | os.PathLike] = (),
) -> SourceSpec:
    """Decide what ``source`` is and freeze the reading options (``None`` -> ``embedfleet.read.*``).

    A folder is ``files`` (or ``parquet`` if it holds only .parquet files); a file is chosen by
    its suffix; ``python-docs`` / ``builtin:python-docs`` is a built-in dataset (an existing
    path of the same name wins over the bare name). ``text_column`` (default ``text``) and
    ``id_column`` apply to JSONL, CSV and Parquet only. ``allowed_roots``: folders every file
    read must really lie under (stored as real paths; checked by the readers when they open a
    file, see the module docs); empty, no restriction.
    """
    exts = _normalise_extensions(extensions if extensions is not None else config.get("read.extensions"))
    options = dict(
        extensions=exts,
        max_document_bytes=_size_option(max_document_bytes, "read.max-document-bytes"),
        max_metadata_bytes=_size_option(max_metadata_bytes, "read.max-metadata-bytes"),
        partition_bytes=_size_option(partition_bytes, "read.partition-bytes"),
        allowed_roots=real_roots(allowed_roots),
    )
    raw = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(raw, str) or not raw.strip():
        raise SourceError(f"no source given; {_accepted(exts)}")

    path = Path(raw).expanduser()
    if raw.startswith("builtin:") or (raw in known_builtins() and not path.exists()):
        name = raw.removeprefix("builtin:")
        get_builtin(name)  # unknown names raise, listing the known ones
        _no_columns("built-in dataset", text_column, id_column)
        return SourceSpec(kind="builtin", location=name, **options)

    if not path.exists():
        raise SourceError(f"source {raw!r} does not exist; {_accepted(exts)}")
    path = path.resolve()
    if path.is_dir():
        kind = _folder_kind(path, exts)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in _TABLE_SUFFIXES:
            kind = _TABLE_SUFFIXES[suffix]
        elif suffix in exts:
            kind = "files"
        else:
            raise SourceError(f"cannot read {path} (unknown file type {suffix or '(none)'!r}); {_accepted(exts)}")
    else:
        raise SourceError(f"source {path} is neither a regular file nor a folder; {_accepted(exts)}")

    if kind == "files":
        _no_columns("folder or text file", text_column, id_column)
        return SourceSpec(kind="files", location=str(path), **options)
    return SourceSpec(
        kind=kind,
        location=str(path),
        text_column=text_column or _DEFAULT_TEXT_COLUMN,
        id_column=id_column or None,
        **options,
    )


def real_roots(roots: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    if isinstance(roots, (str, os.PathLike)):
        raise ConfigError(f"allowed roots must be a list of folders, not one path ({os.fspath(roots)!r})")
    real = set()
    for root in roots:
        text = os.fspath(root)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"an allowed root must be a folder path, not {root!r}")
        real.add(os.path.realpath(os.path.expanduser(text)))
    return tuple(sorted(real))


def _no_columns(what: str, text_column: str | None, id_column: str | None) -> None:
    if text_column or id_column:
        raise SourceError(f"text and id columns apply to JSONL, CSV and Parquet sources, not to a {what}")


def _folder_kind(root: Path, exts: Sequence[str]) -> str:
    matching = parquet = other = unlisted = False
    for rel, _ in _iter_files(root):
        if _unlisted(rel):
            # Its contents are unknown: it makes the folder neither text nor Parquet, but a
            # folder of nothing else is still a source (whose documents must not be deleted).
            unlisted = True
            continue
        suffix = _suffix(rel)
        matching |= suffix in exts
        if suffix == ".parquet":
            parquet = True
        elif not _data_sidecar(rel):
            other = True
        if matching and other:
            break
    if parquet and not other:
        return "parquet"
    if matching or unlisted:
        return "files"
    raise SourceError(
        f"folder {root} has no files ending in {', '.join(exts)} (hidden files and folders are ignored); "
        f"{_accepted(exts)}"
    )


def _suffix(rel: str) -> str:
    return os.path.splitext(rel)[1].lower()


def _data_sidecar(rel: str) -> bool:
    # Spark/Hive/pyarrow datasets carry _SUCCESS, _metadata, _common_metadata beside their
    # .parquet files; they do not make a Parquet folder a folder of text files.
    return rel.rsplit("/", 1)[-1].startswith("_")


def _unlisted(rel: str) -> bool:
    """Whether ``rel`` stands for a folder that could not be listed (``"sub/"``)."""
    return rel.endswith("/")


def _iter_files(root: Path) -> Iterator[tuple[str, int]]:
    """(relative POSIX path, size) of the files under ``root``, in no particular order.

    Hidden entries (``.git``, ``.DS_Store``) are skipped and symlinked folders are not followed
    (no cycles). What exists but cannot be examined is listed with size 0 so that reading it
    reports why: a folder that cannot be listed as ``"<path>/"``, a symlink that loops or
    dangles, a file that cannot be stat'ed. Symlinked files are listed wherever they point: the
    reader checks where the file it opens really is.
    """
    try:
        with os.scandir(root) as it:
            top = list(it)
    except OSError as exc:
        raise SourceError(f"cannot list the source folder {root}: {exc.strerror or exc}") from exc
    stack: list[tuple[str, list[os.DirEntry]]] = [("", top)]
    while stack:
        rel, entries = stack.pop()
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:  # removed while we were listing
                continue
            except OSError:  # its folder can be read but not searched
                yield child, 0
                continue
            if is_dir:
                try:
                    with os.scandir(entry.path) as it:
                        stack.append((child, list(it)))
                except (FileNotFoundError, NotADirectoryError):  # removed or replaced meanwhile
                    continue
                except OSError:
                    yield child + "/", 0
                continue
            try:
                info = entry.stat()
            except FileNotFoundError:
                if entry.is_symlink():  # dangling
                    yield child, 0
                continue
            except OSError:  # a symlink loop, or a file in a folder that cannot be searched
                yield child, 0
                continue
            if stat.S_ISREG(info.st_mode):
                yield child, info.st_size


def _list_files(root: Path) -> list[tuple[str, int]]:
    return sorted(_iter_files(root))


def _root(spec: SourceSpec) -> Path:
    location = Path(spec.location)
    return location if location.is_dir() else location.parent


def _single_file(spec: SourceSpec) -> list[tuple[str, int]]:
    location = Path(spec.location)
    try:
        return [(location.name, location.stat().st_size)]
    except FileNotFoundError:
        raise SourceError(f"source {location} does not exist any more") from None


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class FileGroup:
    """Files of a folder source, by path relative to its root, with their planned sizes."""

    files: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ByteRange:
    """The JSONL lines that *start* in ``[start, start + length)`` of ``path``."""

    path: str
    start: int
    length: int


@dataclass(frozen=True)
class CsvFile:
    path: str
    bytes: int


@dataclass(frozen=True)
class ParquetPiece:
    path: str
    row_group: int
    first_row: int  # 0-based index of the row group's first row in its file
    rows: int


@dataclass(frozen=True)
class ParquetPieces:
    pieces: tuple[ParquetPiece, ...]
    bytes: int  # compressed bytes on disk
    text_bytes: int  # uncompressed bytes of the text column


@dataclass(frozen=True)
class BuiltinPart:
    name: str
    keys: tuple[str, ...]
    bytes: int


Partition = FileGroup | ByteRange | CsvFile | ParquetPieces | BuiltinPart


def plan_partitions(spec: SourceSpec) -> list[Partition]:
    """The read partitions of ``spec``: cheap (listings, sizes, Parquet footers) and deterministic."""
    if spec.kind != "builtin":
        _check_location(spec)
    if spec.kind == "files":
        return _plan_files(spec)
    if spec.kind == "jsonl":
        return _plan_jsonl(spec)
    if spec.kind == "csv":
        files = _single_file(spec)
        for rel, size in files:
            if size > 4 * spec.partition_bytes:
                logger.warning(
                    "%s (%d bytes) is read as one partition: CSV cannot be split safely; JSONL or Parquet can",
                    rel,
                    size,
                )
        return [CsvFile(path=rel, bytes=size) for rel, size in files]
    if spec.kind == "parquet":
        return _plan_parquet(spec)
    if spec.kind == "builtin":
        return _plan_builtin(spec)
    raise SourceError(f"unknown source kind {spec.kind!r}")


def _check_location(spec: SourceSpec) -> None:
    """Refuse to list a source that is no longer where its spec says, or outside the roots.

    The readers check each file again when they open it; this keeps a swapped source folder
    from even being listed (its file names would be the job's doc ids).
    """
    real = os.path.realpath(spec.location)
    if os.path.isdir(spec.location) and real != spec.location:
        raise SourceError(
            f"source folder {spec.location} now resolves to {real} (part of its path was replaced by a "
            "symlink since the job was submitted); submit the job again"
        )
    problem = _outside_roots(spec, real)
    if problem:
        raise SourceError(f"source {spec.location} {problem}")


def _plan_files(spec: SourceSpec) -> list[Partition]:
    location = Path(spec.location)
    if location.is_dir():
        files = [
            (rel, size) for rel, size in _list_files(location) if _unlisted(rel) or _suffix(rel) in spec.extensions
        ]
        if not files:
            raise SourceError(f"folder {location} has no files ending in {', '.join(spec.extensions)}")
    else:
        files = _single_file(spec)
    groups: list[Partition] = []
    current: list[tuple[str, int]] = []
    weight = 0
    for rel, size in files:
        # A file over the limit is not read (it becomes an error row), so it weighs little.
        w = min(size, spec.max_document_bytes + 1) + _FILE_WEIGHT
        if current and weight + w > spec.partition_bytes:
            groups.append(FileGroup(files=tuple(current)))
            current, weight = [], 0
        current.append((rel, size))
        weight += w
    if current:
        groups.append(FileGroup(files=tuple(current)))
    return groups


def _plan_jsonl(spec: SourceSpec) -> list[Partition]:
    [(rel, size)] = _single_file(spec)
    if size == 0:
        return [ByteRange(path=rel, start=0, length=0)]
    step = spec.partition_bytes
    return [ByteRange(path=rel, start=start, length=min(step, size - start)) for start in range(0, size, step)]


def _parquet_files(spec: SourceSpec) -> list[tuple[str, int]]:
    location = Path(spec.location)
    if not location.is_dir():
        return _single_file(spec)
    files = [
        (rel, size) for rel, size in _list_files(location)
        if _unlisted(rel) or (_suffix(rel) == ".parquet" and not _data_sidecar(rel))
    ]
    if not files:
        raise SourceError(f"folder {location} has no .parquet files")
    return files


def _plan_parquet(spec: SourceSpec) -> list[Partition]:
    import pyarrow.parquet as pq

    root = _root(spec)
    groups: list[Partition] = []
    current: list[ParquetPiece] = []
    size = text_size = 0

    def flush() -> None:
        nonlocal current, size, text_size
        if current:
            groups.append(ParquetPieces(pieces=tuple(current), bytes=size, text_bytes=text_size))
        current, size, text_size = [], 0, 0

    unlisted: list[tuple[str, int]] = []
    for rel, size in _parquet_files(spec):
        if _unlisted(rel):
            unlisted.append((rel, size))
            continue
        try:
            with _open_table_file(spec, rel) as f:
                metadata = pq.read_metadata(f)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{rel}: not a readable Parquet file ({exc})") from exc
        _check_columns(spec, rel, metadata.schema.to_arrow_schema())
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
            current.append(ParquetPiece(path=rel, row_group=index, first_row=first_row, rows=group.num_rows))
            size += compressed
            text_size += text
            first_row += group.num_rows
    flush()
    if unlisted:
        # Read as a folder source's would be: one error row each, whatever the source's kind.
        groups.append(FileGroup(files=tuple(unlisted)))
    # A source without a single row group still has one (empty) partition, like an empty JSONL file.
    return groups or [ParquetPieces(pieces=(), bytes=0, text_bytes=0)]


def _check_columns(spec: SourceSpec, rel: str, schema: pa.Schema) -> None:
    names = schema.names
    for role, column in (("text", spec.text_column), ("id", spec.id_column)):
        if column is not None and column not in names:
            raise SourceError(
                f"{rel}: no {role} column {column!r}; its columns are {', '.join(names) or '(none)'}"
                + (" (choose one with --text-column)" if role == "text" else " (choose one with --id-column)")
            )
    text_type = schema.field(spec.text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_binary(text_type)
            or pa.types.is_large_binary(text_type) or pa.types.is_dictionary(text_type)):
        raise SourceError(f"{rel}: text column {spec.text_column!r} holds {text_type}, not text")


def _plan_builtin(spec: SourceSpec) -> list[Partition]:
    dataset = get_builtin(spec.location)
    documents = dataset.load()
    keys = sorted(documents)
    sizes = {k: len(documents[k].encode("utf-8")) for k in keys}
    target = max(1, min(spec.partition_bytes, -(-sum(sizes.values()) // _BUILTIN_PARTITIONS)))
    parts: list[Partition] = []
    current: list[str] = []
    weight = 0
    for key in keys:
        if current and weight + sizes[key] > target:
            parts.append(BuiltinPart(name=dataset.name, keys=tuple(current), bytes=weight))
            current, weight = [], 0
        current.append(key)
        weight += sizes[key]
    if current or not parts:
        parts.append(BuiltinPart(name=dataset.name, keys=tuple(current), bytes=weight))
    return parts


# --------------------------------------------------------------------------- opening files


class _Refused(Exception):
    """A file that is there (or a symlink that is) but cannot or may not be read; str() says why."""


def _open_checked(spec: SourceSpec, path: Path) -> BinaryIO:
    """``path`` open for reading, if the file it really is may be read for ``spec``.

    Raises FileNotFoundError (or NotADirectoryError) for a file that is not there, and
    :class:`_Refused` for one that cannot or may not be read: a symlink loop, a dangling
    symlink, no permission, not a regular file, or a real path outside the source folder or the
    allowed roots.
    """
    try:
        # Non-blocking: a FIFO swapped in for a file must not hang the worker (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        target = _link_target(path)
        if target is None:
            raise
        raise _Refused(f"dangling symlink to {target}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Refused(f"symlink loop ({exc.strerror})") from None
        if isinstance(exc, (PermissionError, IsADirectoryError)):
            raise _Refused(f"cannot read the file: {exc.strerror}") from None
        raise
    f = os.fdopen(fd, "rb")
    try:
        problem = _where_refused(spec, _opened_path(fd, path))
        if problem is None and not stat.S_ISREG(os.fstat(fd).st_mode):
            problem = "not a regular file"
        if problem:
            raise _Refused(problem)
    except BaseException:
        f.close()
        raise
    return f


def _open_table_file(spec: SourceSpec, rel: str) -> BinaryIO:
    """A JSONL/CSV/Parquet file of ``spec``, open; one that cannot be read fails the source."""
    try:
        return _open_checked(spec, _root(spec) / rel)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceError(f"{rel} does not exist any more") from None
    except _Refused as exc:
        raise SourceError(f"{rel}: {exc}") from None


def _link_target(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # not a symlink (or gone)
        return None


def _opened_path(fd: int, path: Path) -> str:
    """The real path of the file ``fd`` holds."""
    try:
        # The file that was opened, whatever the path leads to by now: a symlink swapped in
        # between a check and the open cannot pass one file's check for another.
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no procfs: the path's target now, a check a swap can race
        return os.path.realpath(path)


def _where_refused(spec: SourceSpec, real: str) -> str | None:
    """Why a file of ``spec`` whose real path is ``real`` may not be read, or None."""
    problem = _outside_roots(spec, real)
    if problem is None and spec.kind in ("files", "parquet") and os.path.isdir(spec.location):
        if not _inside(real, spec.location):
            problem = f"resolves to {real}, outside the source folder {spec.location}"
    return problem


def _outside_roots(spec: SourceSpec, real: str) -> str | None:
    if spec.allowed_roots and not any(_inside(real, root) for root in spec.allowed_roots):
        return f"resolves to {real}, outside the allowed roots ({', '.join(spec.allowed_roots)})"
    return None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------- rows


class _Rows:
    """Columns of a DOCUMENTS table being built."""

    def __init__(self) -> None:
        self.doc_id: list[str] = []
        self.text: list[str | None] = []
        self.metadata: list[str | None] = []
        self.error: list[str | None] = []

    def ok(self, doc_id: str, text: str, metadata: str | None) -> None:
        self._add(doc_id, text, metadata, None)

    def fail(self, doc_id: str, reason: str, metadata: str | None = None) -> None:
        self._add(doc_id, None, metadata, reason)

    def _add(self, doc_id: str, text: str | None, metadata: str | None, error: str | None) -> None:
        self.doc_id.append(doc_id)
        self.text.append(text)
        self.metadata.append(metadata)
        self.error.append(error)

    def table(self) -> pa.Table:
        table = pa.Table.from_pydict(
            {"doc_id": self.doc_id, "text": self.text, "metadata": self.metadata, "error": self.error},
            schema=DOCUMENTS,
        )
        return check_schema(table, DOCUMENTS, stage="read")


def _format_size(n: int) -> str:
    from dask.utils import format_bytes

    return f"{n:,} bytes" if n < 1024 else f"{format_bytes(n)} ({n:,} bytes)"


def _too_big(size: int, limit: int) -> str:
    return f"document is {_format_size(size)}, over the limit of {_format_size(limit)} ({_MAX_DOC_KEY})"


def _check_metadata(metadata: str, meta: dict, limit: int) -> str | None:
    """Why ``metadata`` (``meta`` serialised) is too big to copy into every chunk, or None."""
    size = len(metadata.encode("utf-8"))
    if size <= limit:
        return None
    reason = f"metadata is {_format_size(size)}, over the limit of {_format_size(limit)} ({_MAX_META_KEY})"
    if meta:
        reason += f"; its largest field is {max(meta, key=lambda key: len(_dumps({key: meta[key]})))!r}"
    return reason


def _check_text(text: str, limit: int) -> str | None:
    """Why ``text`` cannot be a document, or None."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return f"text contains an unpaired surrogate at character {exc.start}"
    if size > limit:
        return _too_big(size, limit)
    if not text:
        return "empty document"
    if text.isspace():
        return "document is whitespace only"
    return None


def _json_type(value: Any) -> str:
    """``value``'s JSON type with its article, for messages: "an array", "a number", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _jsonable(value: Any) -> Any:
    """``value`` as JSON-native types (what Arrow and CSV give us beyond JSON's own)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


def _dumps(meta: dict) -> str:
    text = json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes: keep them escaped
        text = json.dumps(meta, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text


def _record(rows: _Rows, record: dict, *, location: str | Callable[[], str], spec: SourceSpec) -> None:
    """One table record (a JSON object, a CSV/Parquet row) -> one row of ``rows``.

    ``location`` (``<file>:<n>``) may be a callable: it is then computed only if needed, as
    the doc_id without an id column or to name a record whose id is unusable.
    """
    where = location if callable(location) else lambda: location
    text_column, id_column = spec.text_column or _DEFAULT_TEXT_COLUMN, spec.id_column
    if id_column is None:
        doc_id = where()
    else:
        value = record.get(id_column)
        if value is None:
            rows.fail(where(), f"no value in id column {id_column!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            rows.fail(where(), f"id column {id_column!r} holds {_json_type(value)}, not a string or integer")
            return
        doc_id = str(value)
        if not doc_id.strip():
            rows.fail(where(), f"id column {id_column!r} is empty")
            return
        try:
            doc_id.encode("utf-8")
        except UnicodeEncodeError:
            rows.fail(where(), f"id column {id_column!r} contains an unpaired surrogate")
            return

    if text_column not in record:
        rows.fail(doc_id, f"no text field {text_column!r}")
        return
    text = record[text_column]
    if text is None:
        rows.fail(doc_id, f"text field {text_column!r} is null")
        return
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.fail(doc_id, f"invalid UTF-8 at byte {exc.start} of the text ({exc.reason})")
            return
    if not isinstance(text, str):
        rows.fail(doc_id, f"text field {text_column!r} holds {_json_type(text)}, not a string")
        return
    problem = _check_text(text, spec.max_document_bytes)
    if problem:
        rows.fail(doc_id, problem)
        return

    skip = {text_column, id_column, _METADATA_COLUMN}
    meta = {str(k): _jsonable(v) for k, v in record.items() if k not in skip}
    if _METADATA_COLUMN in record and _METADATA_COLUMN not in (text_column, id_column):
        extra = record[_METADATA_COLUMN]
        if isinstance(extra, (bytes, bytearray)):
            extra = bytes(extra).decode("utf-8", errors="replace")
        if isinstance(extra, str):
            if not extra.strip():
                extra = None
            else:
                try:
                    extra = json.loads(extra)
                except ValueError as exc:
                    rows.fail(doc_id, f"metadata is not valid JSON ({exc})")
                    return
        if isinstance(extra, list) and extra and all(isinstance(p, tuple) and len(p) == 2 for p in extra):
            extra = dict(extra)  # an Arrow map column
        if extra is not None:
            if not isinstance(extra, dict):
                rows.fail(doc_id, f"metadata must be a JSON object, not {_json_type(extra)}")
                return
            # The explicit metadata object wins over a column of the same name.
            meta.update(_jsonable(extra))
    metadata = _dumps(meta)
    problem = _check_metadata(metadata, meta, spec.max_metadata_bytes)
    if problem:
        rows.fail(doc_id, problem)
        return
    rows.ok(doc_id, text, metadata)


# --------------------------------------------------------------------------- read


def read_partition(spec: SourceSpec, descriptor: Partition) -> pa.Table:
    """Read one planned partition into a ``DOCUMENTS`` table (runs on a worker)."""
    if isinstance(descriptor, FileGroup):
        return _read_files(spec, descriptor)
    if isinstance(descriptor, ByteRange):
        return _read_jsonl(spec, descriptor)
    if isinstance(descriptor, CsvFile):
        return _read_csv(spec, descriptor)
    if isinstance(descriptor, ParquetPieces):
        return _read_parquet(spec, descriptor)
    if isinstance(descriptor, BuiltinPart):
        return _read_builtin(spec, descriptor)
    raise SourceError(f"not a partition of a source: {descriptor!r}")


def _read_files(spec: SourceSpec, part: FileGroup) -> pa.Table:
    root = _root(spec)
    rows = _Rows()
    for rel, _ in part.files:
        _read_file(rows, root / rel, rel, spec)
    return rows.table()


def _read_file(rows: _Rows, path: Path, rel: str, spec: SourceSpec) -> None:
    if _unlisted(rel):
        rows.fail(rel, _unlisted_reason(path))
        return
    extension = _suffix(rel)
    meta: dict[str, Any] = {"source": rel, "extension": extension}
    limit = spec.max_document_bytes
    try:
        f = _open_checked(spec, path)
    except (FileNotFoundError, NotADirectoryError):
        rows.fail(rel, "file not found (removed after the source was planned)", _dumps(meta))
        return
    except _Refused as exc:
        rows.fail(rel, str(exc), _dumps(meta))
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        meta["bytes"] = size
        if size > limit:
            rows.fail(rel, _too_big(size, limit), _dumps(meta))
            return
        # The file may grow between the stat and the read: never read past the limit.
        data = f.read(limit + 1)
    meta["bytes"] = len(data)
    if len(data) > limit:
        rows.fail(rel, _too_big(len(data), limit), _dumps(meta))
        return
    nul = data.find(b"\x00")
    if nul >= 0:
        hint = " (UTF-16 text? only UTF-8 is read)" if data.startswith(_UTF16_BOMS) else ""
        rows.fail(rel, f"binary file (NUL byte at offset {nul}){hint}", _dumps(meta))
        return
    html = extension in _HTML_SUFFIXES
    try:
        # A BOM is an encoding marker, not text; everything else is kept exactly.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = _declared_html_decode(data) if html else None
        if text is None:
            rows.fail(rel, f"invalid UTF-8 at byte {exc.start} ({exc.reason}: {data[exc.start:exc.start + 4]!r})", _dumps(meta))
            return
    if html:
        text, title = _html_to_text(text)
        if title:
            meta["title"] = title
        if not text.strip():
            rows.fail(rel, "HTML page has no visible text", _dumps(meta))
            return
    metadata = _dumps(meta)
    # The metadata too: a page's title can be any length.
    problem = _check_text(text, limit) or _check_metadata(metadata, meta, spec.max_metadata_bytes)
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


def _declared_html_decode(data: bytes) -> str | None:
    from bs4.dammit import EncodingDetector

    declared = EncodingDetector.find_declared_encoding(data, is_html=True)
    if not declared or declared.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig"):
        return None
    try:
        return data.decode(declared)
    except (LookupError, UnicodeDecodeError):
        return None


_BLOCK_BREAK = {
    "p", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "dl", "section",
    "article", "header", "footer", "nav", "aside", "main", "figure", "form", "fieldset", "details", "hr",
}
_LINE_BREAK = {"div", "li", "tr", "dt", "dd", "caption", "figcaption", "summary", "address", "option", "legend", "body"}
_DROP = ["script", "style", "head", "noscript", "template"]
_SPACES = re.compile(r"\s+")


def _html_to_text(markup: str) -> tuple[str, str | None]:
    """Visible text of an HTML page, with a newline per block and a blank line per paragraph.

    Whitespace inside ordinary elements is collapsed as a browser would; ``<pre>`` keeps its own.
    Returns the text and the page title.
    """
    from bs4 import BeautifulSoup, Comment, Declaration, Doctype, NavigableString, ProcessingInstruction, Tag

    soup = BeautifulSoup(markup, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for tag in soup.find_all(_DROP):
        tag.decompose()

    parts: list[str] = []
    state = {"break": 0, "space": True}  # pending newlines; whether output ends in whitespace

    def block(newlines: int) -> None:
        state["break"] = max(state["break"], newlines)

    def write(text: str, pre: bool) -> None:
        if not pre:
            text = _SPACES.sub(" ", text)
            if state["break"] or state["space"]:
                text = text.lstrip(" ")
        if not text:
            return
        if state["break"]:
            if parts:
                parts[-1] = parts[-1].rstrip(" ")
                parts.append("\n" * state["break"])
            state["break"] = 0
        parts.append(text)
        state["space"] = text[-1].isspace()

    def walk(node: Tag, pre: bool) -> None:
        for child in node.children:
            if isinstance(child, (Comment, Declaration, Doctype, ProcessingInstruction)):
                continue
            if isinstance(child, NavigableString):
                write(str(child), pre)
            elif isinstance(child, Tag):
                name = child.name.lower()
                if name == "br":
                    if parts:
                        parts[-1] = parts[-1].rstrip(" ")
                    parts.append("\n")
                    state["space"] = True
                    continue
                newlines = 2 if name in _BLOCK_BREAK else 1 if name in _LINE_BREAK else 0
                if name in ("td", "th") and parts and not state["space"]:
                    write(" ", False)
                block(newlines)
                walk(child, pre or name in ("pre", "textarea"))
                block(newlines)

    walk(soup, False)
    text = "".join(parts).strip()
    return text, title or None


def _read_jsonl(spec: SourceSpec, part: ByteRange) -> pa.Table:
    end = part.start + part.length
    rows = _Rows()
    with _open_table_file(spec, part.path) as f:
        if part.start > 0:
            # Finish the line that started before this range: it belongs to the previous one.
            f.seek(part.start - 1)
            f.readline()
        pos = f.tell()
        lines = _LineNumbers(f.fileno(), pos)
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

    def __init__(self, fd: int, offset: int):
        self.fd, self.offset, self.base = fd, offset, None

    def number(self, index: int) -> int:
        if self.base is None:
            self.base = _newlines_before(self.fd, self.offset)
        return self.base + index


def _jsonl_line(rows: _Rows, line: bytes, *, line_start: int, spec: SourceSpec, location: Callable[[], str]) -> None:
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
        rows.fail(location(), f"line is {_json_type(record)}, not a JSON object")
        return
    _record(rows, record, location=location, spec=spec)


def _newlines_before(fd: int, offset: int) -> int:
    """Newlines in the first ``offset`` bytes of the open file ``fd`` (its position unmoved)."""
    count = position = 0
    while position < offset:
        block = os.pread(fd, min(offset - position, 8 * 2**20), position)
        if not block:
            break
        count += block.count(b"\n")
        position += len(block)
    return count


def _read_csv(spec: SourceSpec, part: CsvFile) -> pa.Table:
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
    with _open_table_file(spec, part.path) as f:
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
    _check_columns(spec, part.path, pa.schema(
        [pa.field(name, pa.binary() if name == spec.text_column else pa.string()) for name in header]
    ))
    good = [fields for _, fields in records if isinstance(fields, list)]
    typed = _csv_typed_columns(spec, header, good)
    rows = _Rows()
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
        _record(rows, record, location=location, spec=spec)
    return rows.table()


def _csv_typed_columns(spec: SourceSpec, header: list[str], good: list[list[str]]) -> dict[str, list]:
    """The values of the CSV's metadata columns, typed by pyarrow.csv from the good rows."""
    import pyarrow.csv as pacsv

    untyped = {spec.text_column, spec.id_column, _METADATA_COLUMN}
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


def _read_parquet(spec: SourceSpec, part: ParquetPieces) -> pa.Table:
    import pyarrow.parquet as pq

    rows = _Rows()
    files: dict[str, Any] = {}
    with contextlib.ExitStack() as opened:
        for piece in part.pieces:
            if piece.path not in files:
                files[piece.path] = pq.ParquetFile(opened.enter_context(_open_table_file(spec, piece.path)))
                _check_columns(spec, piece.path, files[piece.path].schema_arrow)
            table = files[piece.path].read_row_group(piece.row_group)
            for k, record in enumerate(table.to_pylist()):
                _record(rows, record, location=f"{piece.path}:{piece.first_row + k + 1}", spec=spec)
    return rows.table()


def _read_builtin(spec: SourceSpec, part: BuiltinPart) -> pa.Table:
    dataset = get_builtin(part.name)
    documents = dataset.load()
    rows = _Rows()
    for key in part.keys:
        doc_id = dataset.doc_id(key)
        meta = _dumps({dataset.key_field: key})
        text = documents.get(key)
        if text is None:
            rows.fail(doc_id, f"{key!r} is not in this worker's copy of {dataset.name}", meta)
            continue
        problem = _check_text(text, spec.max_document_bytes)
        if problem:
            rows.fail(doc_id, problem, meta)
        else:
            rows.ok(doc_id, text, meta)
    return rows.table()


# --------------------------------------------------------------------------- dask


def _read_frame(descriptor: Partition, spec: SourceSpec):
    return read_partition(spec, descriptor).to_pandas()


def read_documents(spec: SourceSpec, *, plan: Sequence[Partition] | None = None):
    """The documents frame of ``spec``: one Dask partition per planned partition, in plan order.

    The driver only plans; workers read. Pass ``plan`` if you already have it (listing a large
    folder twice is not free).
    """
    import dask.dataframe as dd

    partitions = list(plan) if plan is not None else plan_partitions(spec)
    if not partitions:
        raise SourceError(f"source {spec.display} has nothing to read")
    meta = DOCUMENTS.empty_table().to_pandas()
    return dd.from_map(_read_frame, partitions, args=[spec], meta=meta, label="read-documents", enforce_metadata=False)


def estimate_chunks(spec: SourceSpec, chunk_spec: ChunkSpec, *, plan: Sequence[Partition] | None = None) -> int:
    """A cheap, generous estimate of the chunks ``spec`` will give, from byte sizes only.

    Assumptions: a token is ~4 bytes of text, a word ~6, a character 1 (bytes >= characters,
    so character counts are over-estimated for non-ASCII text); a document of ``u`` units
    gives ``1 + ceil(max(0, u - size) / (size - overlap))`` chunks. Folder files and built-in
    documents are estimated one by one (files over the size limit count 0); Parquet from the
    footers' row counts and text-column sizes; JSONL and CSV, whose record count is unknown
    until read, as one stream of text plus one chunk per 1 KiB (assumed record size). Markup,
    JSON keys and metadata columns count as text: the estimate errs high.
    """
    per_unit = _CHARS_PER_UNIT[chunk_spec.unit]
    size, step = chunk_spec.size, chunk_spec.size - chunk_spec.overlap

    def document(nbytes: int) -> int:
        if nbytes <= 0:
            return 0
        units = -(-nbytes // per_unit)
        return 1 + -(-max(0, units - size) // step)

    def stream(nbytes: int, records: int) -> int:
        return -(-(-(-nbytes // per_unit)) // step) + records

    total = 0
    builtin_sizes: dict[str, dict[str, int]] = {}
    for part in plan if plan is not None else plan_partitions(spec):
        if isinstance(part, FileGroup):
            total += sum(document(n) for _, n in part.files if n <= spec.max_document_bytes)
        elif isinstance(part, ByteRange):
            total += stream(part.length, -(-part.length // _ASSUMED_RECORD_BYTES))
        elif isinstance(part, CsvFile):
            total += stream(part.bytes, -(-part.bytes // _ASSUMED_RECORD_BYTES))
        elif isinstance(part, ParquetPieces):
            total += stream(part.text_bytes, sum(p.rows for p in part.pieces))
        elif isinstance(part, BuiltinPart):
            if part.name not in builtin_sizes:
                documents = get_builtin(part.name).load()
                builtin_sizes[part.name] = {k: len(v.encode("utf-8")) for k, v in documents.items()}
            total += sum(document(builtin_sizes[part.name].get(k, 0)) for k in part.keys)
    return total
