"""Resident models: one load per model per worker process, LRU-bounded by count and memory.

Tasks receive a small frozen :class:`~embedfleet.config.EmbedderSpec` and call
:func:`get_embedder`; the model is loaded the first time a process needs it and kept for
the life of the process, never shipped in the graph and never reloaded per partition.

The bounds come from the spec (``cache_max_models`` / ``cache_max_bytes``, built on the client
from ``embedfleet.embed.cache.max-models`` / ``max-memory``), because workers never read
dask.config. When a load makes the cache exceed either bound, least recently used models are
evicted until it fits; the model just loaded is always kept, even if it alone is larger than
the memory bound (it has to run).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict

from embedfleet.config import EmbedderSpec
from embedfleet.embedders.base import Embedder
from embedfleet.embedders.registry import backend_factory

logger = logging.getLogger(__name__)

__all__ = ["get_embedder", "load_count", "resident", "clear", "configure", "limits"]

# Re-entrant: a backend being loaded (under the lock) may itself ask the cache what is resident.
_lock = threading.RLock()
_models: "OrderedDict[tuple, Embedder]" = OrderedDict()
_loads = 0
_load_counts: dict[str, int] = {}
_max_models = 2
_max_bytes = 4 * 2**30


def configure(*, max_models: int, max_bytes: int) -> None:
    """Set the bounds for this process; the next load evicts down to them."""
    global _max_models, _max_bytes
    with _lock:
        _max_models, _max_bytes = max(1, int(max_models)), int(max_bytes)


def limits() -> tuple[int, int]:
    return _max_models, _max_bytes


def get_embedder(spec: EmbedderSpec) -> Embedder:
    global _loads, _max_models, _max_bytes
    key = spec.cache_key
    with _lock:
        # The latest job's bounds win: two jobs with different bounds on one worker cannot
        # both be honoured, and the newest config is what the operator last asked for.
        _max_models = max(1, int(getattr(spec, "cache_max_models", _max_models)))
        _max_bytes = int(getattr(spec, "cache_max_bytes", _max_bytes))
        embedder = _models.get(key)
        if embedder is not None:
            _models.move_to_end(key)
            embedder.spec = spec  # batch_tokens/threads may differ between jobs sharing one model
            return embedder
        # Evict before loading when the count is already at its bound, so a worker never
        # holds max-models + 1 models at once.
        _evict(room_for=1)
        # Loading under the lock: two threads of one worker must not load the same model twice.
        embedder = backend_factory(spec.backend, getattr(spec, "backend_path", None))(spec)
        _loads += 1
        _load_counts[spec.model.name] = _load_counts.get(spec.model.name, 0) + 1
        _models[key] = embedder
        _evict(room_for=0)
        if embedder.memory_bytes > _max_bytes:
            logger.warning(
                "model %s holds %.0f MiB, more than the cache bound of %.0f MiB; kept because it is in use",
                embedder.name, embedder.memory_bytes / 2**20, _max_bytes / 2**20,
            )
        return embedder


def _over(room_for: int) -> bool:
    return len(_models) + room_for > _max_models or sum(m.memory_bytes for m in _models.values()) > _max_bytes


def _evict(*, room_for: int) -> None:
    # The newest entry (the one just loaded or about to be used) is never evicted.
    keep = 0 if room_for else 1
    evicted = False
    while len(_models) > keep and _over(room_for):
        _, oldest = _models.popitem(last=False)
        logger.info("evicted model %s (%.0f MiB) from the worker cache", oldest.name, oldest.memory_bytes / 2**20)
        try:
            oldest.close()
        except Exception:  # noqa: BLE001 - a failed close must not fail the task that needs the room
            logger.exception("closing evicted model %s failed", oldest.name)
        evicted = True
    if evicted:
        gc.collect()


def load_count(model: str | None = None) -> int:
    """Models loaded by this process so far, or loads of ``model`` (by name).

    Tests read it on each worker with ``Client.run(load_count)``.
    """
    return _loads if model is None else _load_counts.get(model, 0)


def resident() -> list[str]:
    """Names of the models held, least recently used first."""
    with _lock:
        return [m.name for m in _models.values()]


def clear() -> None:
    global _loads
    with _lock:
        for model in _models.values():
            model.close()
        _models.clear()
        _load_counts.clear()
        _loads = 0
