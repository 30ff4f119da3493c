"""``POST /v1/embeddings``: OpenAI-compatible, micro-batched across concurrent requests.

Each model has one :class:`Batcher`: requests put their texts on a bounded queue and await
futures; one worker thread takes up to ``max-batch`` texts (waiting at most ``max-wait`` for a
batch to fill) and embeds them in one model call. Identical texts waiting at the same time
share one future (computed once), recent results are kept in an LRU, and a full queue is
refused at once (429 with Retry-After) rather than grown without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from embedfleet import config

__all__ = ["Batcher", "EmbeddingMetrics", "Overloaded"]

log = logging.getLogger(__name__)


class Overloaded(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"embedding queue full; retry in {retry_after:.1f}s")
        self.retry_after = retry_after


class _Pending:
    __slots__ = ("futures", "text")

    def __init__(self, text: str):
        self.text = text
        self.futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []


class Batcher:
    def __init__(self, embedder, *, max_batch: int | None = None, max_wait: float | None = None,
                 queue_limit: int | None = None, cache_size: int | None = None,
                 metrics: EmbeddingMetrics | None = None, model: str = ""):
        self.embedder = embedder
        self.model = model
        self.max_batch = int(max_batch or config.get("server.embeddings.max-batch"))
        self.max_wait = float(max_wait if max_wait is not None else config.seconds_value("server.embeddings.max-wait"))
        self.queue_limit = int(queue_limit or config.get("server.embeddings.queue-limit"))
        self.cache_size = int(cache_size if cache_size is not None else config.get("server.embeddings.cache-size"))
        self._cache: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._inflight: dict[str, _Pending] = {}
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._rate = 1000.0  # texts/s, measured; for Retry-After
        self._thread = threading.Thread(target=self._work, name=f"embedfleet-embed-{model}", daemon=True)
        self._thread.start()
        self.metrics = metrics

    def close(self) -> None:
        self._queue.put(None)

    async def embed(self, texts: list[str]) -> tuple[list[np.ndarray], int]:
        """Vectors for ``texts`` (in order) and their token count."""
        loop = asyncio.get_running_loop()
        results: list[Any] = [None] * len(texts)
        waits: list[tuple[int, asyncio.Future]] = []
        with self._lock:
            new = [t for t in dict.fromkeys(texts) if t not in self._cache and t not in self._inflight]
            if self._waiting + len(new) > self.queue_limit:
                raise Overloaded(retry_after=max(1.0, (self._waiting + len(new)) / max(self._rate, 1.0)))
            for i, text in enumerate(texts):
                cached = self._cache.get(text)
                if cached is not None:
                    self._cache.move_to_end(text)
                    results[i] = cached
                    if self.metrics:
                        self.metrics.lookups.labels("cached").inc()
                    continue
                pending = self._inflight.get(text)
                if pending is None:
                    pending = self._inflight[text] = _Pending(text)
                    self._waiting += 1
                    self._queue.put(pending)
                    if self.metrics:
                        self.metrics.lookups.labels("computed").inc()
                elif self.metrics:
                    self.metrics.lookups.labels("shared").inc()
                future = loop.create_future()
                pending.futures.append((loop, future))
                waits.append((i, future))
        for i, future in waits:
            results[i] = await future
        return [r[0] for r in results], int(sum(r[1] for r in results))

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        texts = [p.text for p in batch]
        started = time.perf_counter()
        try:
            counts = self.embedder.count_tokens(texts)
            vectors = self.embedder.embed(texts, counts)
            outcome: list[Any] = [(vectors[i], int(counts[i])) for i in range(len(texts))]
            error = None
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request
            log.warning("embedding a batch of %d texts failed: %s", len(texts), exc)
            outcome, error = [], exc
        took = time.perf_counter() - started
        if took > 0:
            self._rate = 0.8 * self._rate + 0.2 * (len(texts) / took)
        if self.metrics:
            self.metrics.batch_size.observe(len(texts))
        with self._lock:
            for i, pending in enumerate(batch):
                self._inflight.pop(pending.text, None)
                self._waiting -= 1
                if error is None and self.cache_size > 0:
                    self._cache[pending.text] = outcome[i]
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        for i, pending in enumerate(batch):
            for loop, future in pending.futures:
                if error is None:
                    loop.call_soon_threadsafe(_resolve, future, outcome[i], None)
                else:
                    loop.call_soon_threadsafe(_resolve, future, None, error)


def _resolve(future: asyncio.Future, value, error) -> None:
    if future.done():  # the request went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class EmbeddingMetrics:
    """The batcher's Prometheus metrics, one set per registry (all models share it)."""

    def __init__(self, registry):
        from prometheus_client import Counter, Histogram

        self.lookups = Counter("embedfleet_embeddings_texts", "Texts asked of /v1/embeddings, by how they were answered",
                               ["result"], registry=registry)
        self.batch_size = Histogram("embedfleet_embeddings_batch_size", "Texts per shared model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
