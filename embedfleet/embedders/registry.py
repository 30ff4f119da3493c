"""Embedder backends by name: a dict of built-ins with an ``embedfleet.embedders`` entry-point fallback."""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import Callable

from embedfleet.config import EmbedderSpec
from embedfleet.embedders.base import Embedder
from embedfleet.errors import UnknownBackendError

__all__ = ["register", "known_backends", "check_backend", "backend_factory"]

# "module:Class" strings, so torch or onnxruntime are imported only by the backend that needs them.
_BACKENDS: dict[str, str | Callable[[EmbedderSpec], Embedder]] = {
    "sentence-transformers": "embedfleet.embedders.sentence_transformers:SentenceTransformerEmbedder",
    "onnx": "embedfleet.embedders.onnx:OnnxEmbedder",
    "fake": "embedfleet.embedders.fake:FakeEmbedder",
}


def register(name: str, factory: str | Callable[[EmbedderSpec], Embedder]) -> None:
    """Add a backend. Workers need it too: register it in a module the workers import, or via entry point."""
    _BACKENDS[name] = factory


@functools.lru_cache(maxsize=1)
def _entry_point_names() -> frozenset[str]:
    # Scanning installed distributions costs milliseconds; job submission calls this per job.
    return frozenset(ep.name for ep in entry_points(group="embedfleet.embedders"))


def known_backends() -> list[str]:
    return sorted(set(_BACKENDS) | _entry_point_names())


def check_backend(name: str) -> None:
    """Refuse, listing the known ones, a backend name no module registered (before a job is queued)."""
    if name not in known_backends():
        raise UnknownBackendError("embedder backend", name, known_backends())


def backend_factory(name: str) -> Callable[[EmbedderSpec], Embedder]:
    factory = _BACKENDS.get(name)
    if factory is None:
        for ep in entry_points(group="embedfleet.embedders"):
            if ep.name == name:
                factory = ep.load()
                break
    if factory is None:
        raise UnknownBackendError("embedder backend", name, known_backends())
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    return factory
