"""The per-partition work of each stage, as pure functions Dask runs on workers.

Each takes paths and frozen specs (never objects or dask.config), writes its output
atomically (:mod:`embedfleet.frames.io`) and returns a small dict of counts, so a finished
partition is skipped when a job resumes and the driver never holds the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import threading
import time
from typing import Any, Callable, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa

from embedfleet.config import ChunkSpec, EmbedderSpec, RetrySpec
from embedfleet.errors import CollectionMismatch, DocumentError, SinkError
from embedfleet.frames.io import (
    copy_file,
    exists,
    is_done,
    make_dirs,
    read_json,
    read_table,
    sidecar,
    write_json_atomic,
    write_table_atomic,
)
from embedfleet.frames.schemas import CHUNKS, DOCUMENTS, check_schema, embeddings_schema
from embedfleet.frames.storage import is_url, location
from embedfleet.sinks.base import CollectionInfo, SinkSpec

logger = logging.getLogger(__name__)

__all__ = ["chunk_stage", "read_chunk_stage", "embed_stage", "embed_many_stage", "write_many_stage", "store_ids_stage", "write_stage", "delete_stage", "manifest_stage", "with_retries"]

T = TypeVar("T")


def chunk_stage(
    documents: pd.DataFrame | pa.Table,
    *,
    out_path: str,
    chunk: ChunkSpec,
    model_path: str | None,
    max_tokens: int,
    on_error: str,
) -> dict[str, Any]:
    from embedfleet.tasks.chunking import chunk_partition

    if isinstance(documents, pd.DataFrame):
        documents = pa.Table.from_pandas(documents, schema=DOCUMENTS, preserve_index=False)
    documents = check_schema(documents, DOCUMENTS, stage="read")
    errors = documents.column("error").to_pylist()
    doc_ids = documents.column("doc_id").to_pylist()
    skipped = [{"doc_id": d, "reason": e} for d, e in zip(doc_ids, errors) if e is not None]
    if skipped and on_error == "fail":
        raise DocumentError(skipped[0]["doc_id"], skipped[0]["reason"])
    chunks = chunk_partition(
        documents, unit=chunk.unit, size=chunk.size, overlap=chunk.overlap, model_path=model_path, max_tokens=max_tokens,
        structure=chunk.structure, heading_context=chunk.heading_context,
    )
    chunks = check_schema(chunks, CHUNKS, stage="chunk")
    write_table_atomic(chunks, out_path)
    stats = {
        "documents": len(doc_ids) - len(skipped),
        "chunks": chunks.num_rows,
        "skipped_documents": skipped,
    }
    write_json_atomic(stats, sidecar(out_path))
    return stats


def read_chunk_stage(source: Any, descriptor: Any, *, out_path: str, **chunk_options: Any) -> dict[str, Any]:
    """Read one planned partition of ``source`` and chunk it, in one task.

    One task, not a read task feeding a chunk task: the documents would then live only in the
    read task's worker memory, and a worker lost after chunking made the scheduler read the
    partition again. A partition whose chunks are on disk is not redone.
    """
    if is_done(out_path):
        return read_json(sidecar(out_path))
    from embedfleet.datasets.readers import read_partition

    cached = _source_cache(source, descriptor, out_path, chunk_options)
    if cached is not None and is_done(cached):
        # The same objects (sizes and ETags), chunked the same way, by an earlier job: not read again.
        copy_file(cached, out_path)
        stats = read_json(sidecar(cached))
        write_json_atomic(stats, sidecar(out_path))
        return stats
    stats = chunk_stage(read_partition(source, descriptor), out_path=out_path, **chunk_options)
    if cached is not None:
        make_dirs(cached.parent)
        copy_file(out_path, cached)
        write_json_atomic(stats, sidecar(cached))
    return stats


#: Under the data dir: chunk files of object-store partitions, by what they were made from.
SOURCE_CACHE = "source-cache"


def _source_cache(source: Any, descriptor: Any, out_path: str, chunk_options: dict[str, Any]) -> Any:
    """Where the chunks of ``descriptor`` are kept for later jobs, for an object-store source.

    The key is everything the chunks depend on: the source's options, the partition with each
    object's size and version (ETag), the chunking and the tokenizer; a rewritten object has a
    new ETag, so a new key. Local sources are read again (a stat is no proof of sameness
    there, and reading a local disk is cheap). Stale entries are never read; the folder may be
    deleted at any time.
    """
    if not is_url(getattr(source, "location", "")):
        return None
    key = hashlib.sha256(repr((source, dataclasses.astuple(descriptor), sorted(chunk_options.items()))).encode())
    digest = key.hexdigest()
    data_dir = location(out_path).parent.parent.parent.parent  # <data-dir>/jobs/<job>/chunks/<file>
    return data_dir / SOURCE_CACHE / digest[:2] / f"{digest}.parquet"


def _vectors_column(vectors: np.ndarray, dimensions: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dimensions)


def embed_stage(
    in_path: str,
    row_start: int,
    row_stop: int,
    *,
    out_path: str,
    embedder: EmbedderSpec,
    heading_context: bool = False,
) -> dict[str, Any]:
    return embed_many_stage([(in_path, row_start, row_stop, out_path)], embedder=embedder,
                            heading_context=heading_context)[0]


def embed_many_stage(
    slices: list[tuple[str, int, int, str]], *, embedder: EmbedderSpec, heading_context: bool = False
) -> list[dict[str, Any]]:
    """Embed the rows ``[start, stop)`` of each ``(in_path, start, stop, out_path)`` in one model call.

    The micro-batch of coalesced small jobs (pipeline/batch.py): a one-document job has a few
    chunks, and a task per job would pay the task's and the model call's fixed cost for each.
    Every slice still gets its own output file and stats, so each job is charged for and
    resumes from its own partitions, whatever it was embedded beside.
    """
    from embedfleet.embedders.cache import get_embedder
    from embedfleet.embedders.hardware import release_freed_memory

    results: list[dict[str, Any] | None] = [None] * len(slices)
    todo = []
    for i, (_, _, _, out_path) in enumerate(slices):
        if is_done(out_path):
            # Dask runs a task again whose result was lost with its worker: the vectors are on disk.
            results[i] = read_json(sidecar(out_path))
        else:
            todo.append(i)
    if not todo:
        return results  # type: ignore[return-value]
    tables = []
    for i in todo:
        in_path, row_start, row_stop, _ = slices[i]
        table = read_table(in_path, schema=CHUNKS).slice(row_start, row_stop - row_start)
        tables.append(check_schema(table, CHUNKS, stage="embed input"))
    table = pa.concat_tables(tables)
    model = get_embedder(embedder)
    texts = table.column("text").to_pylist()
    if heading_context:  # chunked with room for it: n_tokens counts the section path too
        from embedfleet.tasks.chunking.structure import embedding_texts

        texts = embedding_texts(texts, table.column("metadata").to_pylist())
    vectors, stats = model.embed_with_stats(texts, table.column("n_tokens").to_numpy(), batch_tokens=embedder.batch_tokens)
    out = table.append_column(pa.field("embedding", pa.list_(pa.float32(), model.dimensions), nullable=False),
                              _vectors_column(vectors, model.dimensions))
    out = check_schema(out, embeddings_schema(model.dimensions), stage="embed")
    # Each slice's share of the call's tokens, padding, requests and time, by its real tokens;
    # the last slice takes what rounding left, so the shares add up to the call's totals.
    n_tokens = table.column("n_tokens").to_numpy().astype(np.float64)
    total = max(1.0, float(n_tokens.sum()))
    left = {"real_tokens": stats.real_tokens, "padded_tokens": stats.padded_tokens, "requests": stats.requests,
            "tokens_sent": stats.tokens_sent}
    offset = 0
    for n, (i, part) in enumerate(zip(todo, tables)):
        rows = part.num_rows
        share = float(n_tokens[offset:offset + rows].sum()) / total
        write_table_atomic(out.slice(offset, rows), slices[i][3])
        offset += rows
        last = n == len(todo) - 1
        counts = {k: v if last else round(getattr(stats, k) * share) for k, v in left.items()}
        for k, v in counts.items():
            left[k] -= v
        result = {"rows": rows, **counts, "seconds": stats.seconds * (1.0 if len(todo) == 1 else share),
                  "precision": model.precision, "pid": os.getpid()}
        write_json_atomic(result, sidecar(slices[i][3]))
        results[i] = result
    del table, tables, out, vectors  # dropped first, so their pages are among those handed back
    release_freed_memory()
    return results  # type: ignore[return-value]


MANIFEST = pa.schema([("doc_id", pa.string()), ("chunk_id", pa.string())])


def manifest_stage(chunks_path: str | list[str], *, out_path: str) -> int:
    """One file of a collection's next manifest: the doc and chunk ids of one chunk file, or of
    several (coalesced jobs), each chunk id once."""
    paths = [chunks_path] if isinstance(chunks_path, str) else list(chunks_path)
    tables = [read_table(p, columns=["doc_id", "chunk_id"]) for p in paths]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if len(tables) > 1:
        _, first = np.unique(table.column("chunk_id").to_numpy(zero_copy_only=False), return_index=True)
        table = table.take(pa.array(np.sort(first)))
    table = check_schema(table, MANIFEST, stage="manifest")
    write_table_atomic(table, out_path)
    return table.num_rows


def with_retries(action: Callable[[], T], *, retry: RetrySpec, what: str) -> T:
    """Run ``action``, retrying a SinkError with exponential backoff and full jitter.

    A CollectionMismatch is not transient and is raised at once.
    """
    delay = retry.delay
    for attempt in range(1, retry.attempts + 1):
        try:
            return action()
        except CollectionMismatch:
            raise
        except SinkError as exc:
            if attempt == retry.attempts:
                raise SinkError(f"{what} failed after {retry.attempts} attempts: {exc}") from exc
            sleep = random.uniform(0, min(retry.max_delay, delay))
            # INFO: a retry that works is no failure, and the last one is raised (one line, DESIGN §7).
            logger.info("%s failed (attempt %d/%d), retrying in %.2fs: %s", what, attempt, retry.attempts, sleep, exc)
            time.sleep(sleep)
            delay *= 2
    raise AssertionError("unreachable")


_sinks_lock = threading.Lock()
_open_collections: dict[tuple, Any] = {}


def _collection(sink: SinkSpec, name: str, info: CollectionInfo):
    """One open collection per (sink, name) per process: connecting per partition would be slow."""
    from embedfleet.sinks.registry import open_sink

    key = (sink, name, info)
    with _sinks_lock:
        found = _open_collections.get(key)
        if found is None:
            found = open_sink(sink).open(name, info=info, create=True)
            _open_collections[key] = found
        return found


def forget_collections() -> None:
    with _sinks_lock:
        _open_collections.clear()


def write_stage(
    embeddings_path: str, *, sink: SinkSpec, collection: str, info: CollectionInfo, retry: RetrySpec, marker: str
) -> int:
    if exists(marker):
        return read_json(marker)["written"]
    return write_many_stage([embeddings_path], sink=sink, collection=collection, info=info, retry=retry,
                            markers=[marker])


def write_many_stage(
    embeddings_paths: list[str], *, sink: SinkSpec, collection: str, info: CollectionInfo, retry: RetrySpec,
    markers: list[str],
) -> int:
    """Write embedding files to the collection in one upsert (one file, or a batch's many small ones).

    Files whose marker exists are skipped; every other one gets its marker once the upsert
    took them all, so a crash before that writes them again (an upsert of the same ids).
    """
    todo = [(path, marker) for path, marker in zip(embeddings_paths, markers) if not exists(marker)]
    if not todo:
        return 0
    tables = [read_table(path) for path, _ in todo]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def upsert() -> int:
        try:
            return _collection(sink, collection, info).upsert(table)
        except SinkError:
            forget_collections()  # reconnect on the next attempt: the server may have restarted
            raise

    what = os.path.basename(todo[0][0]) if len(todo) == 1 else f"{len(todo)} embedding files"
    written = with_retries(upsert, retry=retry, what=f"writing {what} to {sink.uri}")
    for (_, marker), part in zip(todo, tables):
        write_json_atomic({"written": part.num_rows}, marker)
    return written


def store_ids_stage(
    *, sink: SinkSpec, collection: str, info: CollectionInfo, retry: RetrySpec, out_dir: str, rows_per_file: int
) -> list[str]:
    """Every ``doc_id, chunk_id`` the collection holds, as Parquet files under ``out_dir``.

    Mode ``full`` diffs against these instead of the manifest, so chunks a lost or damaged
    manifest no longer names are found and deleted too.
    """
    from embedfleet.tasks.diff import IDS

    def listing() -> list[str]:
        paths: list[str] = []
        batches: list[pa.Table] = []

        def flush() -> None:
            path = f"{out_dir}/store-{len(paths):05d}.parquet"
            write_table_atomic(pa.concat_tables(batches).cast(IDS), path)
            paths.append(path)
            batches.clear()

        try:
            for batch in _collection(sink, collection, info).iter_ids(min(rows_per_file, 10_000)):
                batches.append(batch)
                if sum(b.num_rows for b in batches) >= rows_per_file:
                    flush()
        except SinkError:
            forget_collections()
            raise
        if batches:
            flush()
        return paths

    make_dirs(out_dir)
    return with_retries(listing, retry=retry, what=f"listing the ids of {sink.uri}")


def delete_stage(
    ids_path: str, *, sink: SinkSpec, collection: str, info: CollectionInfo, retry: RetrySpec, marker: str
) -> int:
    if exists(marker):
        return read_json(marker)["deleted"]
    ids = read_table(ids_path, columns=["chunk_id"]).column("chunk_id").to_pylist()

    def delete() -> int:
        try:
            return _collection(sink, collection, info).delete(ids)
        except SinkError:
            forget_collections()
            raise

    deleted = with_retries(delete, retry=retry, what=f"deleting stale chunks from {sink.uri}") if ids else 0
    write_json_atomic({"deleted": deleted}, marker)
    return deleted
