"""The pyarrow schema of every frame, and the check run at each stage boundary (DESIGN §2)."""

from __future__ import annotations

import pyarrow as pa

from embedfleet.errors import EmbedfleetError

__all__ = [
    "CHUNKS",
    "DOCUMENTS",
    "SchemaMismatch",
    "check_schema",
    "embeddings_schema",
]

# `error` is not in DESIGN's documents frame: a reader that cannot read a document emits a row
# with the reason instead of raising, so skipped documents travel with the data (and are
# counted and reported) without a side channel back to the driver.
DOCUMENTS = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("error", pa.string()),
    ]
)

CHUNKS = pa.schema(
    [
        pa.field("chunk_id", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("chunk_index", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("start", pa.int32(), nullable=False),
        pa.field("end", pa.int32(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("metadata", pa.string()),
    ]
)


def embeddings_schema(dimensions: int) -> pa.Schema:
    return CHUNKS.append(pa.field("embedding", pa.list_(pa.float32(), dimensions), nullable=False))


class SchemaMismatch(EmbedfleetError):
    pass


def check_schema(table: pa.Table, expected: pa.Schema, *, stage: str) -> pa.Table:
    """Return ``table`` if its columns and types are ``expected``'s, else raise naming the difference."""
    got = {f.name: f.type for f in table.schema}
    want = {f.name: f.type for f in expected}
    if got == want and table.schema.names == expected.names:
        return table
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    wrong = [f"{n}: {got[n]} != {want[n]}" for n in want if n in got and got[n] != want[n]]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    if wrong:
        parts.append("types " + "; ".join(wrong))
    if not parts:
        parts.append(f"column order {table.schema.names} != {expected.names}")
    raise SchemaMismatch(f"{stage}: frame does not match its schema: {', '.join(parts)}")
