"""ChromaDB: ``chroma:///abs/dir`` (embedded PersistentClient) or ``chroma://host:port`` (server)."""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np

from embedfleet.config import private_dir
from embedfleet.errors import ConfigError, SinkError
from embedfleet.sinks.base import CollectionInfo, Hit, Sink, SinkCollection, SinkSpec, keep_last, metadata_for_store

if TYPE_CHECKING:  # a search reads no frames: pyarrow is imported where one is made
    import pyarrow as pa

logger = logging.getLogger(__name__)

__all__ = ["ChromaSink", "ChromaCollection"]

_RESERVED = ("doc_id", "chunk_index", "start", "end")


_PERSISTENT_CLIENT_LOCK = threading.Lock()


def _client(spec: SinkSpec):
    # Telemetry off through the environment rather than Settings: Chroma refuses a second
    # PersistentClient on one path with different settings in a process, and users open
    # our stores with plain chromadb.PersistentClient(path).
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    try:
        import chromadb
    except ImportError as exc:  # pragma: no cover - chromadb is a core dependency
        from embedfleet.errors import BackendUnavailableError

        raise BackendUnavailableError("the chroma sink", "chroma", str(exc)) from exc

    parts = urlsplit(spec.uri)
    try:
        if parts.netloc:
            if not parts.hostname:
                raise ConfigError(f"sink {spec.uri!r}: expected chroma://host:port")
            headers = dict(spec.option("headers", ()) or ())
            return chromadb.HttpClient(
                host=parts.hostname,
                port=parts.port or 8000,
                ssl=bool(spec.option("ssl", False)),
                headers=headers or None,
            ), False
        if not parts.path.startswith("/"):
            raise ConfigError(f"sink {spec.uri!r}: an embedded Chroma store needs an absolute path, chroma:///abs/dir")
        # The store holds every chunk's text: a new one is its owner's only.
        private_dir(parts.path)
        # Chroma shares one System per path within a process, but creating it is not
        # thread-safe: two dispatcher threads starting jobs on one store at once both fail.
        with _PERSISTENT_CLIENT_LOCK:
            return chromadb.PersistentClient(path=parts.path), True
    except ConfigError:
        raise
    except Exception as exc:
        raise SinkError(f"cannot connect to Chroma at {spec.uri}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """Why a Chroma call failed, on one line.

    chromadb re-raises a transport error with a message of its own ("Could not connect to a
    Chroma server") or with none (an HTTP error without a body becomes ``ValueError('')``),
    and leaves the real reason, such as a refused connection, in the exception's context.
    """
    messages: list[str] = []
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        first = next(iter(str(cause).strip().splitlines()), "")
        if first and first not in messages:
            messages.append(first)
        cause = cause.__cause__ or cause.__context__
    if not messages:
        return type(exc).__name__
    return messages[0] if len(messages) == 1 else f"{messages[0]} ({messages[-1]})"


class ChromaCollection(SinkCollection):
    def __init__(self, collection, info: CollectionInfo, max_batch_size: int):
        self._collection = collection
        self.name = collection.name
        self.info = info
        self._max_batch_size = max_batch_size

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    def upsert(self, frame: pa.Table) -> int:
        written = 0
        for batch in keep_last(frame).to_batches(max_chunksize=self._max_batch_size):
            if batch.num_rows == 0:
                continue
            cols = batch.to_pydict()
            vectors = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
            vectors = vectors.reshape(batch.num_rows, -1).astype(np.float32, copy=False)
            metadatas = []
            for i in range(batch.num_rows):
                meta = {k: v for k, v in metadata_for_store(cols["metadata"][i]).items() if k not in _RESERVED}
                meta.update(
                    doc_id=cols["doc_id"][i],
                    chunk_index=int(cols["chunk_index"][i]),
                    start=int(cols["start"][i]),
                    end=int(cols["end"][i]),
                )
                metadatas.append(meta)
            try:
                self._collection.upsert(
                    ids=cols["chunk_id"], embeddings=vectors, documents=cols["text"], metadatas=metadatas
                )
            except Exception as exc:
                raise SinkError(f"Chroma upsert into {self.name!r} failed: {_reason(exc)}") from exc
            written += batch.num_rows
        return written

    def delete(self, ids: Sequence[str]) -> int:
        ids = list(ids)
        unique = list(dict.fromkeys(ids))  # Chroma refuses duplicate ids in one request
        for i in range(0, len(unique), self._max_batch_size):
            try:
                self._collection.delete(ids=unique[i : i + self._max_batch_size])
            except Exception as exc:
                raise SinkError(f"Chroma delete from {self.name!r} failed: {_reason(exc)}") from exc
        return len(ids)

    def existing(self, ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(ids))  # Chroma refuses duplicate ids in one request
        found: set[str] = set()
        for i in range(0, len(ids), self._max_batch_size):
            try:
                got = self._collection.get(ids=ids[i : i + self._max_batch_size], include=[])
            except Exception as exc:
                raise SinkError(f"Chroma get from {self.name!r} failed: {_reason(exc)}") from exc
            found.update(got["ids"])
        return found

    def iter_ids(self, batch_size: int) -> Iterator[pa.Table]:
        limit = max(1, min(batch_size, self._max_batch_size))
        offset = 0
        while True:
            try:
                got = self._collection.get(include=["metadatas"], limit=limit, offset=offset)
            except Exception as exc:
                raise SinkError(f"Chroma get from {self.name!r} failed: {_reason(exc)}") from exc
            if not got["ids"]:
                return
            import pyarrow as pa

            doc_ids = [str((meta or {}).get("doc_id", "")) for meta in got["metadatas"]]
            yield pa.table({"doc_id": pa.array(doc_ids, pa.string()), "chunk_id": pa.array(got["ids"], pa.string())})
            offset += len(got["ids"])

    def query(self, vector: np.ndarray, k: int) -> list[Hit]:
        try:
            result = self._collection.query(
                query_embeddings=[np.asarray(vector, dtype=np.float32)],
                n_results=k,
                include=["documents", "metadatas", "distances"],
            )
        except Exception as exc:
            raise SinkError(f"Chroma query on {self.name!r} failed: {_reason(exc)}") from exc
        hits = []
        for chunk_id, text, meta, distance in zip(
            result["ids"][0], result["documents"][0], result["metadatas"][0], result["distances"][0]
        ):
            meta = dict(meta or {})
            score = 1.0 - float(distance) if self.info.metric == "cosine" else -float(distance)
            hits.append(
                Hit(
                    chunk_id=chunk_id,
                    doc_id=str(meta.pop("doc_id", "")),
                    chunk_index=int(meta.pop("chunk_index", -1)),
                    score=score,
                    text=text or "",
                    start=meta.pop("start", None),
                    end=meta.pop("end", None),
                    metadata=meta,
                )
            )
        return hits

    def count(self) -> int:
        return int(self._collection.count())


_CHROMA_SPACE = {"cosine": "cosine", "ip": "ip", "l2": "l2"}


class ChromaSink(Sink):
    scheme = "chroma"

    def __init__(self, spec: SinkSpec):
        super().__init__(spec)
        self._client, self.single_writer = _client(spec)
        configured = spec.option("max-batch-size")
        limit = int(self._client.get_max_batch_size())
        self._max_batch_size = min(int(configured), limit) if configured else limit

    def _lookup(self, name: str):
        try:
            return self._client.get_collection(name, embedding_function=None)
        except Exception as exc:
            if "does not exist" in str(exc) or type(exc).__name__ in ("NotFoundError", "InvalidCollectionException"):
                return None
            raise SinkError(f"cannot read Chroma collection {name!r} at {self.uri}: {_reason(exc)}") from exc

    def _create(self, name: str, info: CollectionInfo):
        metadata: dict[str, Any] = {**info.to_metadata(), "hnsw:space": _CHROMA_SPACE[info.metric]}
        try:
            return self._client.get_or_create_collection(name, metadata=metadata, embedding_function=None)
        except Exception as exc:
            raise SinkError(f"cannot create Chroma collection {name!r}: {_reason(exc)}") from exc

    def _recorded_info(self, name: str, collection) -> CollectionInfo | None:
        return CollectionInfo.from_metadata(collection.metadata)

    def _collection(self, name: str, collection, info: CollectionInfo) -> ChromaCollection:
        return ChromaCollection(collection, info, self._max_batch_size)

    def _record(self, name: str, collection, info: CollectionInfo):
        # modify() replaces the whole metadata, and refuses any "hnsw:" key, even unchanged:
        # the distance function lives on in the collection's configuration.
        kept = {k: v for k, v in (collection.metadata or {}).items() if not k.startswith("hnsw:")}
        try:
            collection.modify(metadata={**kept, **info.to_metadata()})
            return self._client.get_collection(name, embedding_function=None)
        except Exception as exc:
            raise SinkError(f"cannot update the metadata of Chroma collection {name!r}: {_reason(exc)}") from exc

    def list_collections(self) -> list[str]:
        try:
            return sorted(c.name if hasattr(c, "name") else str(c) for c in self._client.list_collections())
        except Exception as exc:
            raise SinkError(f"cannot list collections at {self.uri}: {_reason(exc)}") from exc

    def drop(self, name: str) -> None:
        if self._lookup(name) is None:
            raise SinkError(f"collection {name!r} does not exist in {self.uri}")
        self._client.delete_collection(name)
