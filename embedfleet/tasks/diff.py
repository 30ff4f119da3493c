"""A job's chunks against what its collection already holds, as plain per-file tasks (DESIGN §6).

The driver runs jobs in threads beside an in-process scheduler, and on Python 3.11 two threads
building dask.dataframe (dask-expr) graphs at once deadlock on ``functools.cached_property``'s
class-wide lock. So the diff is no dataframe merge: the ``(doc_id, chunk_id)`` rows of the
job's chunk files and of the collection's current ids (its manifest, or the store itself for
mode ``full``) are spread over buckets by a hash of the doc_id, and each bucket is compared
with pyarrow in one task. All rows of a document land in one bucket, so a bucket sees whole
documents: which are gone from the source, which were skipped (and keep their vectors), and
which doc_id two documents share.

A bucket's two id sets are all any task holds; the driver moves only paths and counts.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedfleet.frames.io import make_dirs, read_table, write_table_atomic
from embedfleet.frames.storage import Remote, location
from embedfleet.options import Mode

__all__ = ["BUCKET_ROWS", "IDS", "NEW_COLUMNS", "bucket_count", "diff_bucket_stage", "protected_mask", "select_stage", "split_stage"]

#: The manifest's rows, and what every "old" input of the diff holds.
IDS = pa.schema([("doc_id", pa.string()), ("chunk_id", pa.string())])
NEW_COLUMNS = ["doc_id", "chunk_id", "chunk_index"]
#: Rows a bucket aims for: two sets of a million ids take a few hundred MiB in one task.
BUCKET_ROWS = 1_000_000


def _write(table: pa.Table, path: str | Path | Remote) -> None:
    make_dirs(location(path).parent)
    write_table_atomic(table, path)


def bucket_count(rows: int) -> int:
    return max(1, -(-rows // BUCKET_ROWS))


def _bucket_of(doc_ids: pa.ChunkedArray | pa.Array, buckets: int) -> np.ndarray:
    return np.fromiter((zlib.crc32(d.encode("utf-8")) % buckets for d in doc_ids.to_pylist()),
                       dtype=np.int64, count=len(doc_ids))


def split_stage(path: str, *, columns: Sequence[str], out_dir: str, tag: str, buckets: int) -> dict[int, str]:
    """Spread one file's rows over ``buckets`` files ``<out_dir>/b<bucket>-<tag>.parquet``.

    Returns bucket -> file for the buckets that got rows. Rewriting a bucket file gives the
    same rows, so a task Dask runs twice is harmless.
    """
    table = read_table(path, columns=list(columns))
    if not table.num_rows:
        return {}
    of = _bucket_of(table.column("doc_id"), buckets)
    order = np.argsort(of, kind="stable")
    table, of = table.take(pa.array(order)), of[order]
    bounds = np.flatnonzero(np.diff(of)) + 1
    written = {}
    for start, stop in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(of)]])):
        bucket = int(of[start])
        out = f"{out_dir}/b{bucket:04d}-{tag}.parquet"
        _write(table.slice(int(start), int(stop - start)), out)
        written[bucket] = out
    return written


def protected_mask(doc_ids: pa.ChunkedArray | pa.Array, protected: Sequence[str]) -> pa.ChunkedArray | pa.Array:
    """Which ``doc_ids`` belong to a document the job could not read now (they keep their vectors).

    ``protected`` holds the skipped documents' ids; one ending in ``/`` is a folder that could
    not be listed, and protects every document under it.
    """
    exact = [p for p in protected if not p.endswith("/")]
    mask = pc.is_in(doc_ids, value_set=pa.array(exact, pa.string()))
    for folder in (p for p in protected if p.endswith("/")):
        mask = pc.or_(mask, pc.starts_with(doc_ids, folder))
    return pc.fill_null(mask, False)


def _read(paths: Sequence[str], columns: Sequence[str], schema: pa.Schema) -> pa.Table:
    tables = [read_table(p, columns=list(columns)) for p in paths]
    return pa.concat_tables(tables).select(list(columns)) if tables else schema.empty_table()


def diff_bucket_stage(
    old: Sequence[str],
    new: Sequence[tuple[int, str]],
    *,
    mode: Mode,
    protected: Sequence[str],
    check_duplicates: bool,
    out_dir: str,
    bucket: int,
    groups: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Compare one bucket: the collection's ids (``old``) with the job's chunks (``new``, by origin).

    Writes, under ``out_dir``: ``fresh/<origin>-b<bucket>.parquet`` (chunk ids of each chunk
    file that the collection lacks; not for mode full, which embeds everything),
    ``stale/b<bucket>.parquet`` (chunk ids to delete: sync and full) and
    ``manifest/b<bucket>.parquet`` (this bucket of the collection's next manifest). Returns
    the counts the driver decides on. ``groups`` (the group of each origin; coalesced jobs,
    pipeline/batch.py) limits the duplicate check to doc ids repeated within one group: two
    jobs of one batch may each add a document of the same name.
    """
    out = location(out_dir)
    old_t = _read(old, IDS.names, IDS).cast(IDS)  # the chunk frames' ids are non-nullable, a manifest's not
    parts = [(origin, read_table(path, columns=NEW_COLUMNS)) for origin, path in new]
    new_t = (pa.concat_tables([t for _, t in parts]) if parts
             else pa.schema([("doc_id", pa.string()), ("chunk_id", pa.string()), ("chunk_index", pa.int32())]).empty_table())
    origin = np.concatenate([np.full(t.num_rows, o, dtype=np.int64) for o, t in parts]) if parts else np.empty(0, np.int64)

    duplicates: list[str] = []
    if check_duplicates:
        first = pc.equal(new_t.column("chunk_index"), 0)
        firsts = new_t.filter(first).column("doc_id")
        if groups is None:
            counts = pc.value_counts(firsts)
            duplicates = [str(v) for v, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
                          if n > 1]
        else:
            seen: set[tuple[int, str]] = set()
            repeated: set[str] = set()
            for o, doc in zip(origin[first.to_numpy(zero_copy_only=False)], firsts.to_pylist()):
                key = (groups[int(o)], doc)
                if key in seen:
                    repeated.add(doc)
                seen.add(key)
            duplicates = sorted(repeated)

    old_ids, new_ids = old_t.column("chunk_id"), new_t.column("chunk_id")
    fresh: dict[int, int] = {}
    if mode != "full":
        unknown = pc.invert(pc.is_in(new_ids, value_set=old_ids.combine_chunks())).to_numpy()
        for o in np.unique(origin[unknown]):
            rows = unknown & (origin == o)
            _write(pa.table({"chunk_id": new_ids.filter(pa.array(rows))}), out / "fresh" / f"{o:05d}-b{bucket:04d}.parquet")
            fresh[int(o)] = int(rows.sum())
    else:
        unknown = np.ones(new_t.num_rows, dtype=bool)

    stale = kept = 0
    gone_docs: list[str] = []
    new_ids_rows = new_t.select(IDS.names).cast(IDS)
    if mode == "append":
        added = new_ids_rows.filter(pa.array(unknown))
        if groups is not None and added.num_rows:  # two jobs of a batch may add the same chunk: once
            _, first = np.unique(added.column("chunk_id").to_numpy(zero_copy_only=False), return_index=True)
            added = added.take(pa.array(np.sort(first)))
        next_manifest = pa.concat_tables([old_t, added])
    else:
        dropped = pc.invert(pc.is_in(old_ids, value_set=new_ids.combine_chunks()))
        keep = protected_mask(old_t.column("doc_id"), protected)
        stale_t = old_t.filter(pc.and_(dropped, pc.invert(keep)))
        kept_t = old_t.filter(pc.and_(dropped, keep))
        stale, kept = stale_t.num_rows, kept_t.num_rows
        if stale:
            _write(stale_t.select(["chunk_id"]), out / "stale" / f"b{bucket:04d}.parquet")
        stale_docs = pc.unique(stale_t.column("doc_id"))
        gone = pc.invert(pc.is_in(stale_docs, value_set=pc.unique(new_t.column("doc_id"))))
        gone_docs = stale_docs.filter(gone).to_pylist()
        next_manifest = pa.concat_tables([new_ids_rows, kept_t])
    if next_manifest.num_rows:
        _write(next_manifest, out / "manifest" / f"b{bucket:04d}.parquet")
    return {
        "fresh": fresh,
        "stale": stale,
        "kept": kept,
        "documents_before": len(pc.unique(old_t.column("doc_id"))),
        "documents_gone": len(gone_docs),
        "gone_examples": sorted(gone_docs)[:3],
        "duplicates": sorted(duplicates),
    }


def select_stage(chunks_path: str, fresh: Sequence[str], *, out_path: str) -> int:
    """The rows of one chunk file whose ids are in the ``fresh`` id files: what to embed of it."""
    from embedfleet.frames.schemas import CHUNKS

    ids = _read(fresh, ["chunk_id"], pa.schema([("chunk_id", pa.string())])).column("chunk_id")
    table = read_table(chunks_path, schema=CHUNKS)
    table = table.filter(pc.is_in(table.column("chunk_id"), value_set=ids.combine_chunks()))
    _write(table, out_path)
    return table.num_rows
