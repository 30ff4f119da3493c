"""Search over HTTP with the seeds' cache-aside, and the collections a user may see or drop.

Results are cached (LRU, size and TTL in ``embedfleet.server.search-cache``) under the user,
collection, the collection's current *version*, model, query and k. The version is read from
the job database on every search: the latest end of a job writing into the collection (any
dispatcher or ``embedfleet index``, which records its runs there too) and the number of those
jobs, plus a counter this server bumps when it drops the collection. While a job is running
into it the collection is changing under the reader, so results are not cached at all. Any
write therefore invalidates the cached results of that collection without a purge.

Queries are embedded in this process with the collection's own model, loaded once
(:func:`embedfleet.embedders.cache.get_embedder`); stores are opened once per sink and kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from prometheus_client import Counter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import ConfigError, SinkError
from embedfleet.schedulers.models import Job, read_engine

log = logging.getLogger(__name__)

__all__ = ["NoSuchCollection", "SearchService", "TTLCache"]


class NoSuchCollection(Exception):
    """The user has no collection of that name in that sink (a 404, like another user's)."""


class TTLCache:
    """A thread-safe LRU whose entries also expire ``ttl`` seconds after they were stored."""

    def __init__(self, size: int, ttl: float):
        self.size, self.ttl = size, ttl
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if time.monotonic() - item[0] > self.ttl:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[1]

    def put(self, key: Any, value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = (time.monotonic(), value)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class SearchService:
    def __init__(self, service, sinks: dict[str, str], registry):
        self.service = service
        self.sinks = sinks  # name -> URI
        self._read_engine = read_engine(service.engine)
        self.cache = TTLCache(int(config.get("server.search-cache.size")), config.seconds_value("server.search-cache.ttl"))
        self._open: dict[str, Any] = {}
        self._collections: dict[tuple[str, str], tuple[Any, Any]] = {}  # (uri, physical) -> (version, handle)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._dropped: dict[tuple[str, str], int] = {}
        self.lookups = Counter("embedfleet_search_cache_lookups", "Search cache lookups, by result", ["result"], registry=registry)

    def uri(self, sink: str) -> str:
        uri = self.sinks.get(sink)
        if uri is None:
            raise ConfigError(f"no sink named {sink!r}; this server has {', '.join(sorted(self.sinks))}")
        return uri

    def _sink(self, uri: str):
        with self._guard:
            store = self._open.get(uri)
            if store is None:
                from embedfleet.sinks.registry import open_sink

                store = self._open[uri] = open_sink(uri)
                self._locks[uri] = threading.Lock()
            return store, self._locks[uri]

    def version(self, user: str, collection: str) -> tuple | None:
        """The collection's version for the cache, None while a job writes into it."""
        with Session(self._read_engine) as session, session.begin():
            running, ended, jobs = session.execute(
                select(
                    func.count().filter(Job.status == "running"),
                    func.max(Job.finished_at),
                    func.count(),
                ).where(Job.owner == user, Job.collection == collection)
            ).one()
        if running:
            return None
        return (ended.isoformat() if ended is not None else None, int(jobs), self._dropped.get((user, collection), 0))

    def _collection(self, uri: str, user: str, collection: str, version):
        from embedfleet.sinks.naming import physical_name

        physical = physical_name(user, collection)
        key = (uri, physical)
        cached = self._collections.get(key)
        if cached is not None and version is not None and cached[0] == version:
            return cached[1]
        store, lock = self._sink(uri)
        with lock:
            if physical not in store.list_collections():
                raise NoSuchCollection(collection)
            handle = store.open(physical)
        self._collections[key] = (version, handle)
        return handle

    def search(self, user: str, collection: str, sink: str, query: str, k: int) -> tuple[list[dict], bool]:
        uri = self.uri(sink)
        version = self.version(user, collection)
        handle = self._collection(uri, user, collection, version)
        model = handle.info.model
        key = (user, collection, uri, version, model, query, k)
        if version is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.lookups.labels("hit").inc()
                return hit, True
        self.lookups.labels("miss").inc()
        from embedfleet.embedders.cache import get_embedder

        embedder = get_embedder(config.embedder_spec(model=model, cache_dir=str(config.local_dir(self.service.data_dir) / "models")))
        if embedder.dimensions != handle.info.dimensions:
            raise ConfigError(f"collection {collection!r} has {handle.info.dimensions}-dimensional vectors but model "
                              f"{model!r} is configured with {embedder.dimensions}")
        vector = embedder.embed_query(query)
        _, lock = self._sink(uri)
        with lock:
            hits = handle.query(vector, k)
        rows = [{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": int(h.chunk_index), "score": float(h.score),
                 "text": h.text, "start": h.start, "end": h.end, "section": getattr(h, "section", None)} for h in hits]
        if version is not None:
            self.cache.put(key, rows)
        return rows, False

    # -- collections ---------------------------------------------------------------------------

    def list(self, user: str, sink: str) -> list[dict]:
        from embedfleet.sinks.catalog import (
            describe_user_collection,
            list_user_collections,
        )

        store, lock = self._sink(self.uri(sink))
        rows = []
        with lock:
            for name in list_user_collections(store, user):
                try:
                    rows.append(_public(describe_user_collection(store, user, name), sink))
                except SinkError as exc:
                    rows.append({"name": name, "sink": sink, "error": str(exc)})
        return rows

    def describe(self, user: str, collection: str, sink: str) -> dict:
        from embedfleet.sinks.catalog import describe_user_collection
        from embedfleet.sinks.naming import physical_name

        store, lock = self._sink(self.uri(sink))
        with lock:
            if physical_name(user, collection) not in store.list_collections():
                raise NoSuchCollection(collection)
            return _public(describe_user_collection(store, user, collection), sink)

    def drop(self, user: str, collection: str, sink: str) -> None:
        from embedfleet.pipeline.manifest import Manifest
        from embedfleet.sinks.catalog import drop_user_collection
        from embedfleet.sinks.naming import physical_name

        uri = self.uri(sink)
        store, lock = self._sink(uri)
        with lock:
            if physical_name(user, collection) not in store.list_collections():
                raise NoSuchCollection(collection)
            drop_user_collection(store, user, collection)
            # Its manifest describes vectors that are gone: kept, the next sync would embed nothing.
            Manifest(str(self.service.data_dir), uri, physical_name(user, collection)).drop()
        with self._guard:
            self._dropped[(user, collection)] = self._dropped.get((user, collection), 0) + 1
            self._collections.pop((uri, physical_name(user, collection)), None)

    def hit_rate(self) -> float | None:
        hits = self.lookups.labels("hit")._value.get()
        misses = self.lookups.labels("miss")._value.get()
        return hits / (hits + misses) if hits + misses else None

    def close(self) -> None:
        with self._guard:
            for store in self._open.values():
                try:
                    store.close()
                except Exception as exc:  # noqa: BLE001 - closing at exit
                    log.debug("closing %s: %s", store, exc)
            self._open.clear()


def _public(described: dict, sink: str) -> dict:
    # The physical name and the store's URI are the operator's, not the user's.
    shown = ("model", "dimensions", "metric", "precision", "backend", "families", "mixed", "quality", "count")
    return {"name": described["name"], "sink": sink, **{k: described.get(k) for k in shown}}
