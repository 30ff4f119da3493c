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

Every file is checked where it really is when it is opened, against the source folder and
``SourceSpec.allowed_roots``: see :mod:`embedfleet.datasets.formats.common`.

Formats
-------
Each kind of source is one entry of :data:`embedfleet.datasets.formats.FORMATS` and one module
of that package, whose docstring says how it is partitioned and what its document ids are:
``files`` (folders and single text files), ``jsonl``, ``csv``, ``parquet``, ``builtin``.
This module routes through that table and is the public face of all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from embedfleet import config
from embedfleet.config import ChunkSpec
from embedfleet.datasets.builtin import get_builtin, known_builtins
from embedfleet.datasets.formats import FORMATS, Format
from embedfleet.datasets.formats.builtin import BuiltinPart
from embedfleet.datasets.formats.common import Estimator, check_location, list_objects
from embedfleet.datasets.formats.csv import CsvFile
from embedfleet.datasets.formats.files import FileGroup
from embedfleet.datasets.formats.jsonl import ByteRange
from embedfleet.datasets.formats.listing import (
    is_data_sidecar,
    is_unlisted,
    iter_files,
    suffix_of,
)
from embedfleet.datasets.formats.parquet import ParquetPiece, ParquetPieces
from embedfleet.datasets.formats.tables import DEFAULT_TEXT_COLUMN
from embedfleet.datasets.source import SourceSpec
from embedfleet.errors import ConfigError, SourceError
from embedfleet.frames.schemas import DOCUMENTS
from embedfleet.frames.storage import Remote, is_url

__all__ = [
    "BuiltinPart",
    "ByteRange",
    "CsvFile",
    "FileGroup",
    "ParquetPiece",
    "ParquetPieces",
    "Partition",
    "estimate_chunks",
    "plan_partitions",
    "read_documents",
    "read_partition",
    "real_roots",
    "source_spec",
]

Partition = FileGroup | ByteRange | CsvFile | ParquetPieces | BuiltinPart

# Table formats claim a single file by its suffix; any other file in the extensions is a text document.
_BY_SUFFIX = {suffix: kind for kind, fmt in FORMATS.items() for suffix in fmt.suffixes}


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

    if is_url(raw):
        return _remote_source_spec(raw, text_column=text_column, id_column=id_column, options=options)
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
        if suffix in _BY_SUFFIX:
            kind = _BY_SUFFIX[suffix]
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
        text_column=text_column or DEFAULT_TEXT_COLUMN,
        id_column=id_column or None,
        **options,
    )


def _remote_source_spec(url: str, *, text_column: str | None, id_column: str | None, options: dict) -> SourceSpec:
    """An fsspec URL as a source: a prefix ending in ``/`` is a folder (its objects read as a
    local folder's files would be), anything else one object chosen by its suffix. Only the URL
    is kept: credentials come from each reading process (:mod:`embedfleet.frames.storage`)."""
    exts = options["extensions"]
    target = Remote(url)
    try:
        folder = url.endswith("/") or not target.is_file()
        if folder and not target.exists():
            raise SourceError(f"source {url!r} does not exist; {_accepted(exts)}")
    except OSError as exc:  # no credentials, no such bucket, no route: said once, with the URL
        raise SourceError(f"cannot reach source {url}: {exc}") from exc
    location = f"{target}/" if folder else str(target)
    if folder:
        probe = SourceSpec(kind="files", location=location, **options)
        kind = _kind_of_suffixes([rel for rel, _, _ in list_objects(probe)], exts, location)
    else:
        suffix = target.suffix.lower()
        if suffix in _BY_SUFFIX:
            kind = _BY_SUFFIX[suffix]
        elif suffix in exts:
            kind = "files"
        else:
            raise SourceError(f"cannot read {url} (unknown file type {suffix or '(none)'!r}); {_accepted(exts)}")
    if kind == "files":
        _no_columns("folder or text file", text_column, id_column)
        return SourceSpec(kind="files", location=location, **options)
    return SourceSpec(kind=kind, location=location, text_column=text_column or DEFAULT_TEXT_COLUMN,
                      id_column=id_column or None, **options)


def _kind_of_suffixes(rels: Sequence[str], exts: Sequence[str], where: str) -> str:
    parquet = any(suffix_of(r) == ".parquet" for r in rels)
    other = any(suffix_of(r) != ".parquet" and not is_data_sidecar(r) for r in rels)
    if parquet and not other:
        return "parquet"
    if any(suffix_of(r) in exts for r in rels):
        return "files"
    raise SourceError(f"folder {where} has no files ending in {', '.join(exts)} (hidden files and folders are "
                      f"ignored); {_accepted(exts)}")


def real_roots(roots: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    if isinstance(roots, (str, os.PathLike)):
        raise ConfigError(f"allowed roots must be a list of folders, not one path ({os.fspath(roots)!r})")
    real = set()
    for root in roots:
        text = os.fspath(root)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"an allowed root must be a folder path, not {root!r}")
        # A URL root (s3://bucket/prefix) is a prefix: object stores have no links to resolve.
        real.add(str(Remote(text)) if is_url(text) else os.path.realpath(os.path.expanduser(text)))
    return tuple(sorted(real))


def _no_columns(what: str, text_column: str | None, id_column: str | None) -> None:
    if text_column or id_column:
        raise SourceError(f"text and id columns apply to JSONL, CSV and Parquet sources, not to a {what}")


def _folder_kind(root: Path, exts: Sequence[str]) -> str:
    matching = parquet = other = unlisted = False
    for rel, _ in iter_files(root):
        if is_unlisted(rel):
            # Its contents are unknown: it makes the folder neither text nor Parquet, but a
            # folder of nothing else is still a source (whose documents must not be deleted).
            unlisted = True
            continue
        suffix = suffix_of(rel)
        matching |= suffix in exts
        if suffix == ".parquet":
            parquet = True
        elif not is_data_sidecar(rel):
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


# --------------------------------------------------------------------------- plan and read


def plan_partitions(spec: SourceSpec) -> list[Partition]:
    """The read partitions of ``spec``: cheap (listings, sizes, Parquet footers) and deterministic."""
    fmt = FORMATS.get(spec.kind)
    if fmt is None:
        raise SourceError(f"unknown source kind {spec.kind!r}")
    if fmt.on_disk:
        check_location(spec)
    return fmt.plan(spec)


def read_partition(spec: SourceSpec, descriptor: Partition) -> pa.Table:
    """Read one planned partition into a ``DOCUMENTS`` table (runs on a worker)."""
    return _format_of(descriptor).read(spec, descriptor)


def _format_of(descriptor: Any) -> Format:
    for fmt in FORMATS.values():
        if isinstance(descriptor, fmt.partition):
            return fmt
    raise SourceError(f"not a partition of a source: {descriptor!r}")


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
    chunks = Estimator(chunk_spec)
    by_format: dict[Format, list[Partition]] = {}
    for part in plan if plan is not None else plan_partitions(spec):
        by_format.setdefault(_format_of(part), []).append(part)
    return sum(fmt.estimate(spec, parts, chunks) for fmt, parts in by_format.items())
