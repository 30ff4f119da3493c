"""Resident models: one load per model per worker process, LRU-bounded by count and memory.

Tasks receive a small frozen :class:`~embedfleet.config.EmbedderSpec` and call
:func:`get_embedder`; the model is loaded the first time a process needs it and kept for
the life of the process, never shipped in the graph and never reloaded per partition.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from embedfleet.config import EmbedderSpec
from embedfleet.embedders.base import Embedder
from embedfleet.embedders.registry import backend_factory

logger = logging.getLogger(__name__)

__all__ = ["get_embedder", "load_count", "resident", "clear", "configure"]

_lock = threading.Lock()
_models: "OrderedDict[tuple, Embedder]" = OrderedDict()
_loads = 0
_max_models = 2
_max_bytes = 4 * 2**30


def configure(*, max_models: int, max_bytes: int) -> None:
    global _max_models, _max_bytes
    with _lock:
        _max_models, _max_bytes = max(1, max_models), max_bytes


def get_embedder(spec: EmbedderSpec) -> Embedder:
    global _loads
    key = spec.cache_key
    with _lock:
        embedder = _models.get(key)
        if embedder is not None:
            _models.move_to_end(key)
            embedder.spec = spec  # batch_tokens/threads may differ between jobs sharing one model
            return embedder
        # Loading under the lock: two threads of one worker must not load the same model twice.
        embedder = backend_factory(spec.backend)(spec)
        _loads += 1
        _models[key] = embedder
        _evict(keep=key)
        return embedder


def _evict(*, keep: tuple) -> None:
    while len(_models) > 1 and (
        len(_models) > _max_models or sum(m.memory_bytes for m in _models.values()) > _max_bytes
    ):
        oldest = next(iter(_models))
        if oldest == keep:
            break
        evicted = _models.pop(oldest)
        logger.info("evicted model %s from the worker cache", evicted.name)


def load_count() -> int:
    """Models loaded by this process so far (tests read it on each worker with Client.run)."""
    return _loads


def resident() -> list[str]:
    with _lock:
        return [m.name for m in _models.values()]


def clear() -> None:
    global _loads
    with _lock:
        _models.clear()
        _loads = 0
