"""What one ``embedfleet serve`` process holds: the job service, tokens, sinks by name, caches."""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from embedfleet import config
from embedfleet.errors import ConfigError, PermissionDenied

__all__ = ["ServerState", "named_sinks"]


def named_sinks(data_dir: str | None = None) -> dict[str, str]:
    """``embedfleet.sinks.named``: name -> URI (a null URI is the default sink)."""
    from embedfleet.sinks.catalog import default_sink_uri

    named = dict(config.get("sinks.named", None) or {})
    named.setdefault("default", None)
    out = {}
    for name, uri in named.items():
        out[str(name)] = str(uri) if uri else default_sink_uri(data_dir)
    return out


class ServerState:
    """The server's objects; :func:`embedfleet.server.app.create_app` serves them.

    :param service: the :class:`JobService` (its database and data dir).
    :param registry: the Prometheus registry ``/metrics`` exposes (the dispatcher's, when it runs here).
    """

    def __init__(self, service, *, registry: CollectorRegistry | None = None, dispatcher=None):
        from embedfleet.schedulers.tokens import TokenStore
        from embedfleet.server.limits import RateLimiter, StreamSlots
        from embedfleet.server.search import SearchService

        self.service = service
        self.tokens = TokenStore(service)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.dispatcher = dispatcher
        self.sinks = named_sinks(service.data_dir)
        self.search = SearchService(service, self.sinks, self.registry)
        self.max_inline_bytes = config.bytes_value("server.max-inline-bytes")
        self.max_request_bytes = config.bytes_value("server.max-request-bytes")
        self.max_inputs = int(config.get("server.embeddings.max-inputs"))
        self.rate = RateLimiter(dict(config.get("server.rate-limits") or {}), self._tier_of)
        self.streams = StreamSlots(int(config.get("server.max-event-streams")))
        # This machine's folder of the data dir (the data dir itself unless it is on object
        # storage): inline documents are read from there by the job, so with an object-store
        # data dir they reach only workers on this machine.
        self.local_dir = config.local_dir(service.data_dir)
        self.inline_dir = (self.local_dir / "inline").resolve()
        roots = list(config.get("jobs.allowed-roots", None) or [])
        #: The operator's roots, without the inline folder this server adds for its own files.
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        if roots and str(self.inline_dir) not in roots:
            import dask.config

            # Inline documents are this server's own files: the service's check at submit and the
            # dispatcher's on the workers must let them through; check_source keeps users out.
            # A private root, too: a job reads a file in it only as its own source, so a path job
            # whose file is swapped for a symlink after submit cannot read another user's.
            dask.config.set({"embedfleet.jobs.allowed-roots": [*roots, str(self.inline_dir)],
                             "embedfleet.jobs.private-roots": [str(self.inline_dir)]})
        self._batchers: dict[str, Any] = {}
        self._embedding_metrics = None
        self._batch_guard = threading.Lock()
        self.started = False

    def _tier_of(self, user: str) -> str:
        info = self.service.get_user(user)
        return info.tier if info is not None else str(config.get("jobs.default-tier"))

    # -- sources -----------------------------------------------------------------------------

    def check_source(self, source: str) -> str:
        """A ``source`` path as a submitter may give it: absolute, under the operator's allowed
        roots, not a URL, a regular file or folder that exists, and never in the server's data dir
        (other users' inline documents, job frames). The answer names the operator's roots only:
        the data dir's path is the server's, not the submitter's."""
        if not self.roots:
            raise PermissionDenied("this server takes no source paths (embedfleet.jobs.allowed-roots is empty); "
                                   "send the documents inline")
        if "://" in source:
            raise PermissionDenied("a source over the API is a path under the allowed roots, not a URL")
        if "\x00" in source:
            raise ConfigError("a source path cannot hold a NUL character")
        given = Path(source)
        if not given.is_absolute():
            # Relative to what? The server's working directory is no business of a submitter's.
            raise ConfigError(f"source {source!r} is not an absolute path")
        path = given.resolve()
        data = self.local_dir.resolve()
        if path == data or path.is_relative_to(data) or path.is_relative_to(self.inline_dir):
            raise PermissionDenied("a source may not lie in the server's data dir")
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            raise PermissionDenied(f"source {source!r} is outside the allowed roots "
                                   f"({', '.join(str(r) for r in self.roots)})")
        if not path.exists():
            raise ConfigError(f"source {source!r} does not exist")
        if not (path.is_file() or path.is_dir()):
            # A FIFO or device would block the reader (and a thread of this server) forever.
            raise ConfigError(f"source {source!r} is neither a regular file nor a folder")
        return str(path)

    def write_inline(self, user: str, documents) -> str:
        """Inline documents as a JSONL file of the user's in the data dir: the job's source."""
        from embedfleet.config import private_dir, private_file

        seen: set[str] = set()
        for doc in documents:
            if doc.id in seen:
                raise ConfigError(f"document id {doc.id!r} appears twice")
            seen.add(doc.id)
        private_dir(self.inline_dir)
        folder = private_dir(self.inline_dir / user)
        path = folder / f"{uuid.uuid4().hex}.jsonl"
        tmp = path.with_suffix(".tmp")
        private_file(tmp)
        with open(tmp, "w", encoding="utf-8") as out:
            for doc in documents:
                out.write(json.dumps({"id": doc.id, "text": doc.text, "metadata": doc.metadata or {}}, ensure_ascii=False))
                out.write("\n")
        os.replace(tmp, path)
        return str(path)

    # -- embeddings --------------------------------------------------------------------------

    def batcher(self, model: str):
        from embedfleet.embedders.cache import get_embedder
        from embedfleet.server.embeddings import Batcher, EmbeddingMetrics

        with self._batch_guard:
            found = self._batchers.get(model)
            if found is None:
                if self._embedding_metrics is None:
                    self._embedding_metrics = EmbeddingMetrics(self.registry)
                spec = config.embedder_spec(model=model, cache_dir=str(self.local_dir / "models"))
                found = self._batchers[model] = Batcher(get_embedder(spec), metrics=self._embedding_metrics, model=model)
            return found

    def close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        self.search.close()
