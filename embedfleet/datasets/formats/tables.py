"""What the table formats (JSONL, CSV, Parquet) share: a file, its columns, a record -> a row.

Document ids
------------
The id column if one is given, else ``<file>:<n>``, where ``n`` is the 1-based line number in
a JSONL file and the 1-based record number in CSV and Parquet (a malformed CSV row counts as a
record, so the rows after it keep their numbers). Give an id column for stable ids across edits.

Metadata
--------
Every column besides text and id, plus the keys of a ``metadata`` column (a JSON object, or
JSON text of one), which win over a column of the same name.
"""

from __future__ import annotations

import json
from typing import BinaryIO, Callable

import pyarrow as pa

from embedfleet.datasets.formats.common import (
    Refused,
    Rows,
    check_metadata,
    check_text,
    dumps,
    json_type,
    jsonable,
    open_checked,
    source_root,
)
from embedfleet.datasets.source import SourceSpec
from embedfleet.errors import SourceError

__all__ = ["DEFAULT_TEXT_COLUMN", "METADATA_COLUMN", "open_table_file", "check_columns", "record_row"]

DEFAULT_TEXT_COLUMN = "text"
METADATA_COLUMN = "metadata"


def open_table_file(spec: SourceSpec, rel: str) -> BinaryIO:
    """A JSONL/CSV/Parquet file of ``spec``, open; one that cannot be read fails the source."""
    try:
        return open_checked(spec, source_root(spec) / rel)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceError(f"{rel} does not exist any more") from None
    except Refused as exc:
        raise SourceError(f"{rel}: {exc}") from None


def check_columns(spec: SourceSpec, rel: str, schema: pa.Schema) -> None:
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


def record_row(rows: Rows, record: dict, *, location: str | Callable[[], str], spec: SourceSpec) -> None:
    """One table record (a JSON object, a CSV/Parquet row) -> one row of ``rows``.

    ``location`` (``<file>:<n>``) may be a callable: it is then computed only if needed, as
    the doc_id without an id column or to name a record whose id is unusable.
    """
    where = location if callable(location) else lambda: location
    text_column, id_column = spec.text_column or DEFAULT_TEXT_COLUMN, spec.id_column
    if id_column is None:
        doc_id = where()
    else:
        value = record.get(id_column)
        if value is None:
            rows.fail(where(), f"no value in id column {id_column!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            rows.fail(where(), f"id column {id_column!r} holds {json_type(value)}, not a string or integer")
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
        rows.fail(doc_id, f"text field {text_column!r} holds {json_type(text)}, not a string")
        return
    problem = check_text(text, spec.max_document_bytes)
    if problem:
        rows.fail(doc_id, problem)
        return

    skip = {text_column, id_column, METADATA_COLUMN}
    meta = {str(k): jsonable(v) for k, v in record.items() if k not in skip}
    if METADATA_COLUMN in record and METADATA_COLUMN not in (text_column, id_column):
        extra = record[METADATA_COLUMN]
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
                rows.fail(doc_id, f"metadata must be a JSON object, not {json_type(extra)}")
                return
            # The explicit metadata object wins over a column of the same name.
            meta.update(jsonable(extra))
    metadata = dumps(meta)
    problem = check_metadata(metadata, meta, spec.max_metadata_bytes)
    if problem:
        rows.fail(doc_id, problem)
        return
    rows.ok(doc_id, text, metadata)
