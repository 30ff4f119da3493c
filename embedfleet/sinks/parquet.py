"""A directory of Parquet files as a vector store: ``parquet:///abs/dir``.

Useful as an export format, for offline analysis with pandas/pyarrow/Dask, and as the input
of a Milvus bulk import. Search is brute force with numpy, streaming part files: meant for
small collections and tests, not for serving.

Layout, one subdirectory per collection (its physical name)::

    /abs/dir/<collection>/
        _collection.json             the CollectionInfo (model, dimensions, metric, vector families,
                                     an int8 job's quality report) + format version
        part-000000000001.parquet    rows written by one upsert (or by compact())
        part-000000000002.parquet
        _deletes-000000000003.parquet  tombstones: a single chunk_id column
        _metadata                    Parquet summary: the schema + row groups of every part file
        _common_metadata             the schema alone

The design is log-structured, so every change is one new file renamed into place (written
under a ``.tmp-`` name first) and a crash never leaves a half-written file visible:

* ``upsert`` appends part files (at most ``max-batch-size`` rows each); ``delete`` appends a
  tombstone file. Files share one increasing sequence number.
* A read takes, for each chunk_id, its newest record: a row of the newest part holding it,
  unless a newer tombstone deletes it. :meth:`ParquetCollection.read`,
  :func:`read_collection`, ``count``, ``existing`` and ``query`` all apply this rule, so
  upserting the same frame twice still reads as one row per chunk_id.
* ``compact()`` rewrites the live rows into new part files and then removes the old parts
  and, last, the tombstones (that order keeps every intermediate state correct). With the
  option ``compact-after: N`` an upsert or delete compacts once there are more than N
  files; the default (0) leaves it to the caller (the pipeline's commit stage).

After ``compact()`` the directory is a plain dataset with one row per chunk: names starting
with ``_`` or ``.`` are ignored by pyarrow/pandas/Dask dataset discovery, so
``pandas.read_parquet(dir)`` and ``pyarrow.dataset.parquet_dataset(dir + "/_metadata")``
read exactly the live rows. Before compaction they also see superseded and deleted rows;
use :func:`read_collection` then.

Part files hold the Milvus sink's row layout (:mod:`embedfleet.sinks.milvus`): the
embedding frame's columns with ``embedding`` as ``list<float32>`` (Milvus' Parquet import
reads variable-size lists; fixed-size lists only in recent servers) plus
``text_truncated: bool`` (always false here: Parquet keeps whole texts). To bulk-import a
compacted collection, create the target with the Milvus sink (same model), upload the
``part-*.parquet`` files to the server's object store and pass each as its own import
unit, e.g. ``bulk_import(url, collection_name=name, files=[[f] for f in parts])``. Texts
longer than the target's ``text-max-length`` make the import fail; upsert through the
Milvus sink to have them cut instead.

Options (``embedfleet.sinks.parquet.*``): ``max-batch-size`` (rows per part file, default
100,000), ``row-group-size`` (default 10,000), ``compact-after`` (default 0: never
automatically). One process writes a collection at a time (``single_writer``); a lock file
makes a second writer wait rather than interleave.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedfleet.config import private_dir
from embedfleet.errors import ConfigError, SinkError
from embedfleet.sinks.base import CollectionInfo, Hit, Sink, SinkCollection, SinkSpec, keep_last, metadata_for_store
from embedfleet.frames.schemas import CHUNKS, check_schema, embeddings_schema

logger = logging.getLogger(__name__)

__all__ = ["ParquetSink", "ParquetCollection", "part_schema", "read_collection"]

FORMAT = "embedfleet-parquet"
FORMAT_VERSION = 1
INFO_FILE = "_collection.json"
DEFAULT_MAX_BATCH_SIZE = 100_000
DEFAULT_ROW_GROUP_SIZE = 10_000
_PART = re.compile(r"^part-(\d{12})\.parquet$")
_DELETES = re.compile(r"^_deletes-(\d{12})\.parquet$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_RESERVED = ("doc_id", "chunk_index", "start", "end")
_HIT_COLUMNS = ["chunk_id", "doc_id", "chunk_index", "text", "start", "end", "metadata"]
_DELETES_SCHEMA = pa.schema([pa.field("chunk_id", pa.string(), nullable=False)])


def part_schema(dimensions: int) -> pa.Schema:
    """The schema of a part file: the Milvus sink's row layout."""
    fields = list(CHUNKS)
    fields.append(pa.field("embedding", pa.list_(pa.float32()), nullable=False))
    fields.append(pa.field("text_truncated", pa.bool_(), nullable=False))
    return pa.schema(fields, metadata={b"embedfleet.dimensions": str(dimensions).encode()})


def _check_name(name: str) -> str:
    # The name becomes a directory: nothing that could leave the root.
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise SinkError(f"{name!r} is not a valid collection name for a Parquet store")
    return name


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result into ``path``."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _scores(vectors: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        norms = np.linalg.norm(vectors, axis=1) * (np.linalg.norm(query) or 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = (vectors @ query) / norms
        return np.where(norms > 0, scores, 0.0)
    if metric == "ip":
        return vectors @ query
    # Squared L2, negated so that higher is closer, as Chroma and Milvus report it.
    return -np.sum((vectors - query) ** 2, axis=1)


class ParquetCollection(SinkCollection):
    def __init__(self, sink: "ParquetSink", path: Path, info: CollectionInfo):
        self._sink = sink
        self.path = path
        self.name = path.name
        self.info = info

    @property
    def max_batch_size(self) -> int:
        return self._sink.max_batch_size

    # -- files --------------------------------------------------------------------------

    def _files(self) -> list[tuple[int, str, Path]]:
        """(sequence, "part" | "delete", path), oldest first."""
        out = []
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError as exc:
            raise SinkError(f"collection {self.name!r} was dropped from {self._sink.uri}") from exc
        for entry in entries:
            m = _PART.match(entry.name)
            if m:
                out.append((int(m.group(1)), "part", Path(entry.path)))
                continue
            m = _DELETES.match(entry.name)
            if m:
                out.append((int(m.group(1)), "delete", Path(entry.path)))
        return sorted(out)

    def parts(self) -> list[Path]:
        """The part files, oldest first (what a bulk import or a dataset reader takes)."""
        return [path for _, kind, path in self._files() if kind == "part"]

    @contextlib.contextmanager
    def _writing(self):
        lock_path = self.path / ".lock"
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: rely on single_writer alone
            yield
            return
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _reading(self, action: str):
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(f"Parquet {action} on {self.name!r} at {self._sink.uri} failed: {exc}") from exc

    def _next_seq(self) -> int:
        files = self._files()
        return files[-1][0] + 1 if files else 1

    def _write_part(self, table: pa.Table, seq: int) -> Path:
        path = self.path / f"part-{seq:012d}.parquet"
        _atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=self._sink.row_group_size))
        return path

    def _write_manifest(self, added: Sequence[Path] = ()) -> None:
        """Bring ``_metadata`` up to date after ``added`` parts were written.

        Appending keeps an upsert's cost independent of the number of parts; the summary is
        rebuilt from every footer when it does not list exactly the other parts on disk
        (after a compaction, or a crash between a part's rename and this update).
        """
        manifest = self.path / "_metadata"
        on_disk = {path.name for path in self.parts()}
        added_names = {path.name for path in added}
        metadata = None
        if added:
            try:
                metadata = pq.read_metadata(manifest)
            except (OSError, pa.ArrowException):
                metadata = None
            if metadata is not None:
                listed = {metadata.row_group(i).column(0).file_path for i in range(metadata.num_row_groups)}
                # A part without rows has no row group to list; rebuilding is then exact.
                if listed != on_disk - added_names or listed & added_names:
                    metadata = None
        if metadata is not None:
            for path in added:
                footer = pq.read_metadata(path)
                footer.set_file_path(path.name)
                metadata.append_row_groups(footer)
            _atomic_write(manifest, metadata.write_metadata_file)
            return
        collectors = []
        for path in self.parts():
            footer = pq.read_metadata(path)
            footer.set_file_path(path.name)
            collectors.append(footer)
        schema = part_schema(self.info.dimensions)
        _atomic_write(manifest, lambda tmp: pq.write_metadata(schema, tmp, metadata_collector=collectors))

    def _maybe_compact(self) -> None:
        limit = self._sink.compact_after
        if limit and len(self._files()) > limit:
            self._compact_locked()

    # -- writes -------------------------------------------------------------------------

    def _to_part(self, frame: pa.Table) -> pa.Table:
        check_schema(frame, embeddings_schema(self.info.dimensions), stage=f"upsert into {self.name}")
        frame = keep_last(frame)
        columns = [frame.column(name) for name in CHUNKS.names]
        columns.append(frame.column("embedding").cast(pa.list_(pa.float32())))
        columns.append(pa.array(np.zeros(frame.num_rows, dtype=bool)))
        return pa.Table.from_arrays(columns, schema=part_schema(self.info.dimensions))

    def upsert(self, frame: pa.Table) -> int:
        if frame.num_rows == 0:
            return 0
        table = self._to_part(frame)
        try:
            with self._writing():
                seq = self._next_seq()
                written = []
                for offset in range(0, table.num_rows, self.max_batch_size):
                    written.append(self._write_part(table.slice(offset, self.max_batch_size), seq))
                    seq += 1
                self._write_manifest(written)
                self._maybe_compact()
        except OSError as exc:
            raise SinkError(f"Parquet upsert into {self.name!r} at {self._sink.uri} failed: {exc}") from exc
        return table.num_rows

    def delete(self, ids: Sequence[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        tombstones = pa.Table.from_arrays([pa.array(list(dict.fromkeys(ids)), pa.string())], schema=_DELETES_SCHEMA)
        try:
            with self._writing():
                path = self.path / f"_deletes-{self._next_seq():012d}.parquet"
                _atomic_write(path, lambda tmp: pq.write_table(tombstones, tmp))
                self._maybe_compact()
        except OSError as exc:
            raise SinkError(f"Parquet delete from {self.name!r} at {self._sink.uri} failed: {exc}") from exc
        return len(ids)

    def compact(self) -> int:
        """Rewrite the live rows into fresh part files; returns how many rows are live."""
        try:
            with self._writing():
                return self._compact_locked()
        except OSError as exc:
            raise SinkError(f"Parquet compaction of {self.name!r} at {self._sink.uri} failed: {exc}") from exc

    def _compact_locked(self) -> int:
        old = self._files()
        seq = old[-1][0] + 1 if old else 1
        schema = part_schema(self.info.dimensions)
        pending: list[pa.Table] = []
        pending_rows = 0
        live = 0

        def flush(rows: int) -> None:
            nonlocal seq, pending, pending_rows
            table = pa.concat_tables(pending)
            self._write_part(table.slice(0, rows), seq)
            seq += 1
            rest = table.slice(rows)
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

        for _path, _offset, batch, mask in self._live_batches(schema.names):
            if not mask.any():
                continue
            table = pa.Table.from_batches([batch]).select(schema.names).filter(pa.array(mask)).cast(schema)
            pending.append(table)
            pending_rows += table.num_rows
            live += table.num_rows
            while pending_rows >= self.max_batch_size:
                flush(self.max_batch_size)
        if pending_rows:
            flush(pending_rows)
        # Parts before tombstones: while a tombstone exists, the rows it hides stay hidden.
        for _, kind, path in old:
            if kind == "part":
                path.unlink()
        for _, kind, path in old:
            if kind == "delete":
                path.unlink()
        for entry in os.scandir(self.path):
            if entry.name.startswith(".tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        self._write_manifest()
        logger.info("compacted Parquet collection %s: %d files -> %d live rows", self.name, len(old), live)
        return live

    # -- reads --------------------------------------------------------------------------

    def _live_batches(self, columns: Sequence[str]) -> Iterator[tuple[Path, int, pa.RecordBatch, np.ndarray]]:
        """(part, row offset in it, batch, live mask) for every part, newest first.

        A row is live when no newer part or tombstone holds its chunk_id. Only chunk ids are
        remembered across files; vectors are streamed one batch at a time.
        """
        wanted = list(dict.fromkeys(["chunk_id", *columns]))
        seen: set[str] = set()
        for _, kind, path in reversed(self._files()):
            if kind == "delete":
                seen.update(pq.read_table(path, columns=["chunk_id"]).column(0).to_pylist())
                continue
            offset = 0
            for batch in pq.ParquetFile(path).iter_batches(columns=wanted, batch_size=self._sink.row_group_size):
                ids = batch.column("chunk_id").to_pylist()
                mask = np.fromiter((i not in seen for i in ids), dtype=bool, count=len(ids))
                yield path, offset, batch, mask
                seen.update(ids)
                offset += batch.num_rows

    def iter_ids(self, batch_size: int) -> Iterator[pa.Table]:
        for batch in self.iter_batches(["doc_id", "chunk_id"]):
            for start in range(0, batch.num_rows, max(1, batch_size)):
                yield pa.Table.from_batches([batch.slice(start, batch_size)])

    def iter_batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The live rows, streamed (part layout: ``embedding`` is a variable-size list)."""
        columns = list(columns or part_schema(self.info.dimensions).names)
        for _path, _offset, batch, mask in self._live_batches(columns):
            if mask.any():
                yield batch.select(columns).filter(pa.array(mask))

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All live rows as one table; without ``columns``, an embedding frame."""
        frame_schema = embeddings_schema(self.info.dimensions)
        names = list(columns or frame_schema.names)
        with self._reading("read"):
            batches = list(self.iter_batches(names))
        if batches:
            table = pa.Table.from_batches(batches)
        else:
            source = part_schema(self.info.dimensions)
            table = source.empty_table().select(names)
        if "embedding" in names:
            index = table.schema.get_field_index("embedding")
            table = table.set_column(index, frame_schema.field("embedding"), table.column("embedding").cast(frame_schema.field("embedding").type))
        return table

    def existing(self, ids: Sequence[str]) -> set[str]:
        pending = set(ids)
        found: set[str] = set()
        with self._reading("lookup"):
            for _, kind, path in reversed(self._files()):
                if not pending:
                    break
                hits = set(pq.read_table(path, columns=["chunk_id"]).column(0).to_pylist()) & pending
                if kind == "part":
                    found |= hits
                pending -= hits
        return found

    def count(self) -> int:
        with self._reading("count"):
            return sum(int(mask.sum()) for *_, mask in self._live_batches(["chunk_id"]))

    def query(self, vector: np.ndarray, k: int) -> list[Hit]:
        if k < 1:
            return []
        with self._reading("query"):
            return self._query(vector, k)

    def _query(self, vector: np.ndarray, k: int) -> list[Hit]:
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape[0] != self.info.dimensions:
            raise SinkError(f"query vector has {query.shape[0]} dimensions; collection {self.name!r} holds {self.info.dimensions}")
        best: list[tuple[float, int, str, int]] = []  # min-heap of (score, tiebreak, part, row)
        order = 0
        for path, offset, batch, mask in self._live_batches(["embedding"]):
            rows = np.flatnonzero(mask)
            if rows.size == 0:
                continue
            flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
            vectors = flat.reshape(batch.num_rows, -1)[rows].astype(np.float32, copy=False)
            scores = _scores(vectors, query, self.info.metric)
            top = np.arange(rows.size) if rows.size <= k else np.argpartition(-scores, k - 1)[:k]
            for position in top.tolist():
                # Negative order: among equal scores the newer part (seen first) wins.
                item = (float(scores[position]), -order, str(path), offset + int(rows[position]))
                order += 1
                if len(best) < k:
                    heapq.heappush(best, item)
                elif item > best[0]:
                    heapq.heapreplace(best, item)
        ranked = sorted(best, reverse=True)
        rows_by_part: dict[str, list[int]] = {}
        for _, _, path, row in ranked:
            rows_by_part.setdefault(path, []).append(row)
        fetched = {path: self._fetch(Path(path), rows) for path, rows in rows_by_part.items()}
        hits = []
        for score, _, path, row in ranked:
            record = fetched[path][row]
            meta = {k: v for k, v in metadata_for_store(record["metadata"]).items() if k not in _RESERVED}
            hits.append(
                Hit(
                    chunk_id=record["chunk_id"],
                    doc_id=record["doc_id"],
                    chunk_index=int(record["chunk_index"]),
                    score=float(score),
                    text=record["text"] or "",
                    start=record["start"],
                    end=record["end"],
                    metadata=meta,
                )
            )
        return hits

    def _fetch(self, path: Path, rows: list[int]) -> dict[int, dict[str, Any]]:
        """The hit columns of some rows of one part, reading only the row groups holding them."""
        parquet = pq.ParquetFile(path)
        bounds = np.cumsum([0] + [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)])
        out: dict[int, dict[str, Any]] = {}
        by_group: dict[int, list[int]] = {}
        for row in rows:
            by_group.setdefault(int(np.searchsorted(bounds, row, side="right") - 1), []).append(row)
        for group, group_rows in by_group.items():
            table = parquet.read_row_group(group, columns=_HIT_COLUMNS)
            local = table.take(pa.array([r - int(bounds[group]) for r in group_rows])).to_pylist()
            out.update(zip(group_rows, local))
        return out


def read_collection(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """The live rows of a Parquet collection directory as an embedding frame (any compaction state)."""
    path = Path(path)
    sink = ParquetSink(SinkSpec(uri=f"parquet://{path.parent.resolve()}"))
    return sink.open(path.name).read(columns)


class ParquetSink(Sink):
    scheme = "parquet"
    single_writer = True

    def __init__(self, spec: SinkSpec):
        super().__init__(spec)
        parts = urlsplit(spec.uri)
        if parts.netloc or not parts.path.startswith("/"):
            raise ConfigError(f"sink {spec.uri!r}: a Parquet store needs an absolute directory, parquet:///abs/dir")
        self.root = Path(parts.path)
        self.max_batch_size = int(spec.option("max-batch-size") or DEFAULT_MAX_BATCH_SIZE)
        self.row_group_size = int(spec.option("row-group-size") or DEFAULT_ROW_GROUP_SIZE)
        self.compact_after = int(spec.option("compact-after") or 0)
        if self.max_batch_size < 1 or self.row_group_size < 1 or self.compact_after < 0:
            raise ConfigError("parquet sink: max-batch-size and row-group-size must be positive, compact-after >= 0")

    def _path(self, name: str) -> Path:
        return self.root / _check_name(name)

    def _lookup(self, name: str) -> Path | None:
        path = self._path(name)
        try:
            os.stat(path / INFO_FILE)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SinkError(f"cannot read {path / INFO_FILE}: {exc}") from exc
        return path

    def _create(self, name: str, info: CollectionInfo) -> Path:
        path = self._path(name)
        try:
            # The collection holds every chunk's text: a new store and collection are their owner's only.
            private_dir(self.root)
            private_dir(path)
            leftovers = [p.name for p in path.iterdir() if not p.name.startswith(".")]
            if leftovers:
                raise SinkError(f"{path} exists and is not an embedfleet collection (holds {', '.join(sorted(leftovers)[:3])})")
            document = {"format": FORMAT, "version": FORMAT_VERSION, "name": path.name, "info": info.to_metadata()}
            schema = part_schema(info.dimensions)
            pq.write_metadata(schema, path / "_common_metadata")
            pq.write_metadata(schema, path / "_metadata")
            tmp = path / f".tmp-{uuid.uuid4().hex}-{INFO_FILE}"
            tmp.write_text(json.dumps(document, indent=2, sort_keys=True))
            try:
                # link() refuses to replace: if another creator won, its record stands.
                os.link(tmp, path / INFO_FILE)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        except OSError as exc:
            raise SinkError(f"cannot create Parquet collection {name!r} in {self.uri}: {exc}") from exc
        logger.info("created Parquet collection %s in %s (%s)", name, self.root, info.model)
        return path

    def _recorded_info(self, name: str, path: Path) -> CollectionInfo:
        try:
            with open(path / INFO_FILE) as f:
                recorded = json.load(f)
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot read {path / INFO_FILE}: {exc}") from exc
        info = CollectionInfo.from_metadata(recorded.get("info") if isinstance(recorded, dict) else None)
        if info is None or recorded.get("format") != FORMAT:
            raise SinkError(f"{path / INFO_FILE} does not describe an embedfleet collection")
        if int(recorded.get("version", 0)) > FORMAT_VERSION:
            raise SinkError(f"collection {path.name!r} was written by a newer embedfleet (format {recorded['version']})")
        return info

    def _collection(self, name: str, path: Path, info: CollectionInfo) -> ParquetCollection:
        return ParquetCollection(self, path, info)

    def _record(self, name: str, path: Path, info: CollectionInfo) -> Path:
        info_path = path / INFO_FILE
        try:
            with ParquetCollection(self, path, info)._writing():
                document = json.loads(info_path.read_text())
                document["info"] = {**document.get("info", {}), **info.to_metadata()}
                _atomic_write(info_path, lambda tmp: tmp.write_text(json.dumps(document, indent=2, sort_keys=True)))
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot update {info_path}: {exc}") from exc
        return path

    def list_collections(self) -> list[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SinkError(f"cannot list collections at {self.uri}: {exc}") from exc
        return sorted(
            e.name for e in entries if e.is_dir() and not e.name.startswith(".") and os.path.exists(os.path.join(e.path, INFO_FILE))
        )

    def drop(self, name: str) -> None:
        path = self._path(name)
        if not (path / INFO_FILE).exists():
            raise SinkError(f"collection {name!r} does not exist in {self.uri}")
        # Rename first: the collection disappears at once; the files go afterwards.
        trash = self.root / f".dropped-{name}-{uuid.uuid4().hex}"
        try:
            os.replace(path, trash)
            shutil.rmtree(trash)
        except OSError as exc:
            raise SinkError(f"cannot drop Parquet collection {name!r} in {self.uri}: {exc}") from exc
