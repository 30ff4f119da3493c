"""What every format shares: the :class:`Format` interface, opening a file where it really is,
the rows of a ``DOCUMENTS`` table, the size limits, and metadata as JSON.

Where files really are
----------------------
Every reader checks the real path of the file it has opened (``/proc/self/fd``, so a symlink
swapped in after the open changes nothing), on the worker, when it reads: a file of a folder
source must lie inside the source folder, and any file inside one of ``SourceSpec.allowed_roots``
when those are given. A document that resolves outside is an error row ("resolves to /x, outside
the allowed roots"); a table file, a SourceError. Planning refuses a source folder whose own real
path changed since the spec was built (a folder replaced by a symlink), and a source outside the
allowed roots (:func:`check_location`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import errno
import json
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from embedfleet.config import ChunkSpec
from embedfleet.datasets.source import SourceSpec
from embedfleet.errors import SourceError
from embedfleet.frames.schemas import DOCUMENTS, check_schema
from embedfleet.frames.storage import Remote, filesystem, is_url, object_version

__all__ = [
    "Estimator",
    "Format",
    "Refused",
    "Rows",
    "check_location",
    "check_metadata",
    "check_text",
    "dumps",
    "file_size",
    "is_remote",
    "json_type",
    "jsonable",
    "list_objects",
    "open_checked",
    "plan_repr",
    "read_range",
    "single_file",
    "single_object",
    "source_root",
    "too_big",
]

_MAX_DOC_KEY = "embedfleet.read.max-document-bytes"
_MAX_META_KEY = "embedfleet.read.max-metadata-bytes"
# Bytes of text per chunking unit; bytes >= characters, so non-ASCII text is over-estimated.
_BYTES_PER_UNIT = {"tokens": 4, "words": 6, "chars": 1}
# JSONL/CSV record count is unknown without reading; each record gives at least one chunk.
_ASSUMED_RECORD_BYTES = 1024


# --------------------------------------------------------------------------- the interface


@dataclass(frozen=True)
class Format:
    """One kind of source: its entry in :data:`embedfleet.datasets.formats.FORMATS`.

    ``plan`` runs on the driver and returns small frozen descriptors (cheap: listings, sizes,
    footers; deterministic, as a job's resume fingerprint is the plan's repr). ``read`` runs on
    a worker: one descriptor of type ``partition`` -> a ``DOCUMENTS`` table. ``estimate``
    counts the chunks of all of a plan's descriptors of that type at once, so a format that
    must load something to estimate loads it once. Read and estimate go by the descriptor's
    type, not the source's kind: a plan may hold another format's descriptors (a Parquet
    folder's unlistable subfolder is a files ``FileGroup``).
    """

    partition: type
    plan: Callable[[SourceSpec], list]
    read: Callable[[SourceSpec, Any], pa.Table]
    estimate: Callable[[SourceSpec, Sequence[Any], Estimator], int]
    # Lower-case file suffixes that make a single file a source of this kind.
    suffixes: tuple[str, ...] = ()
    # Whether the source's location is a path (checked before planning) rather than a name.
    on_disk: bool = True


@dataclass(frozen=True)
class Estimator:
    """Chunk counts from byte sizes alone, for one chunking (see ``estimate_chunks``)."""

    chunk: ChunkSpec

    def _units(self, nbytes: int) -> int:
        return -(-nbytes // _BYTES_PER_UNIT[self.chunk.unit])

    @property
    def _step(self) -> int:
        return self.chunk.size - self.chunk.overlap

    def document(self, nbytes: int) -> int:
        """Chunks of one document of ``nbytes``."""
        if nbytes <= 0:
            return 0
        return 1 + -(-max(0, self._units(nbytes) - self.chunk.size) // self._step)

    def stream(self, nbytes: int, records: int) -> int:
        """Chunks of ``records`` documents holding ``nbytes`` of text between them."""
        return -(-self._units(nbytes) // self._step) + records

    def unknown_records(self, nbytes: int) -> int:
        """Chunks of a stream whose records are counted only by reading it."""
        return self.stream(nbytes, -(-nbytes // _ASSUMED_RECORD_BYTES))


# --------------------------------------------------------------------------- locations


def is_remote(spec: SourceSpec) -> bool:
    """Whether the source is an fsspec URL; its location then ends in ``/`` exactly when it is a folder."""
    return is_url(spec.location)


def source_root(spec: SourceSpec) -> Path | Remote:
    """The folder a source's relative paths are relative to."""
    if is_remote(spec):
        location = Remote(spec.location)
        return location if spec.location.endswith("/") else location.parent
    location = Path(spec.location)
    return location if location.is_dir() else location.parent


def plan_repr(part: Any) -> str:
    """A partition's repr, the fingerprint a job resumes by: its fields, and its object's
    version only when it has one, so local plans read exactly as they always did."""
    shown = [f"{f.name}={getattr(part, f.name)!r}" for f in fields(part) if f.repr or getattr(part, f.name)]
    return f"{type(part).__qualname__}({', '.join(shown)})"


def single_object(spec: SourceSpec) -> tuple[str, int, str]:
    """A single-object source's name, size and version (:func:`~embedfleet.frames.storage.object_version`)."""
    location = Remote(spec.location)
    try:
        info = location.info()
    except FileNotFoundError:
        raise SourceError(f"source {spec.location} does not exist any more") from None
    return location.name, int(info.get("size") or 0), object_version(info)


def list_objects(spec: SourceSpec) -> list[tuple[str, int, str]]:
    """(relative path, size, version) of the objects under a folder URL, sorted; hidden ones left out.

    One listing gives every object's size and ETag, so a re-run knows an unchanged object
    without reading it. An object store has no symlinks and no unreadable folders.
    """
    root = Remote(spec.location)
    fs_root = str(root).split("://", 1)[1]
    try:
        found = filesystem(str(root)).find(fs_root, detail=True)
    except FileNotFoundError:
        found = {}
    except OSError as exc:
        raise SourceError(f"cannot list the source folder {spec.location}: {exc}") from exc
    out = []
    for name, info in found.items():
        rel = name[len(fs_root):].lstrip("/")
        if not rel or info.get("type") == "directory" or any(p.startswith(".") for p in rel.split("/")):
            continue
        out.append((rel, int(info.get("size") or 0), object_version(info)))
    return sorted(out)


def read_range(spec: SourceSpec, rel: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a remote source's object, by one ranged GET."""
    target = str(source_root(spec) / rel)
    return filesystem(target).cat_file(target.split("://", 1)[1], start=start, end=end)


def file_size(f: Any) -> int:
    """The size of an open file: a local one's fstat, an fsspec file's listed size."""
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError):
        return int(f.size)


def single_file(spec: SourceSpec) -> list[tuple[str, int]]:
    if is_remote(spec):
        name, size, _ = single_object(spec)
        return [(name, size)]
    location = Path(spec.location)
    try:
        return [(location.name, location.stat().st_size)]
    except FileNotFoundError:
        raise SourceError(f"source {location} does not exist any more") from None


def check_location(spec: SourceSpec) -> None:
    """Refuse to list a source that is no longer where its spec says, or outside the roots.

    The readers check each file again when they open it; this keeps a swapped source folder
    from even being listed (its file names would be the job's doc ids).
    """
    if is_remote(spec):
        problem = _outside_roots(spec, spec.location)
        if problem:
            raise SourceError(f"source {spec.location} {problem}")
        return
    real = os.path.realpath(spec.location)
    if os.path.isdir(spec.location) and real != spec.location:
        raise SourceError(
            f"source folder {spec.location} now resolves to {real} (part of its path was replaced by a "
            "symlink since the job was submitted); submit the job again"
        )
    problem = _outside_roots(spec, real)
    if problem:
        raise SourceError(f"source {spec.location} {problem}")


# --------------------------------------------------------------------------- opening files


class Refused(Exception):
    """A file that is there (or a symlink that is) but cannot or may not be read; str() says why."""


def open_checked(spec: SourceSpec, path: Path | Remote) -> BinaryIO:
    """``path`` open for reading, if the file it really is may be read for ``spec``.

    Raises FileNotFoundError (or NotADirectoryError) for a file that is not there, and
    :class:`Refused` for one that cannot or may not be read: a symlink loop, a dangling
    symlink, no permission, not a regular file, or a real path outside the source folder or the
    allowed roots. An object (a :class:`Remote`) is checked against the roots by its URL.
    """
    if isinstance(path, Remote):
        problem = _outside_roots(spec, str(path))
        if problem:
            raise Refused(problem)
        return path.open("rb")
    try:
        # Non-blocking: a FIFO swapped in for a file must not hang the worker (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        target = _link_target(path)
        if target is None:
            raise
        raise Refused(f"dangling symlink to {target}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(f"symlink loop ({exc.strerror})") from None
        if isinstance(exc, (PermissionError, IsADirectoryError)):
            raise Refused(f"cannot read the file: {exc.strerror}") from None
        raise
    f = os.fdopen(fd, "rb")
    try:
        problem = _where_refused(spec, _opened_path(fd, path))
        if problem is None and not stat.S_ISREG(os.fstat(fd).st_mode):
            problem = "not a regular file"
        if problem:
            raise Refused(problem)
    except BaseException:
        f.close()
        raise
    return f


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


# --------------------------------------------------------------------------- rows and limits


class Rows:
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


def too_big(size: int, limit: int) -> str:
    return f"document is {_format_size(size)}, over the limit of {_format_size(limit)} ({_MAX_DOC_KEY})"


def check_metadata(metadata: str, meta: dict, limit: int) -> str | None:
    """Why ``metadata`` (``meta`` serialised) is too big to copy into every chunk, or None."""
    size = len(metadata.encode("utf-8"))
    if size <= limit:
        return None
    reason = f"metadata is {_format_size(size)}, over the limit of {_format_size(limit)} ({_MAX_META_KEY})"
    if meta:
        reason += f"; its largest field is {max(meta, key=lambda key: len(dumps({key: meta[key]})))!r}"
    return reason


def check_text(text: str, limit: int) -> str | None:
    """Why ``text`` cannot be a document, or None."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return f"text contains an unpaired surrogate at character {exc.start}"
    if size > limit:
        return too_big(size, limit)
    if not text:
        return "empty document"
    if text.isspace():
        return "document is whitespace only"
    return None


# --------------------------------------------------------------------------- JSON metadata


def json_type(value: Any) -> str:
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


def jsonable(value: Any) -> Any:
    """``value`` as JSON-native types (what Arrow and CSV give us beyond JSON's own)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
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


def dumps(meta: dict) -> str:
    text = json.dumps(meta, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes: keep them escaped
        text = json.dumps(meta, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text
