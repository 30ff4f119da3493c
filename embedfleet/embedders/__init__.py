"""Embedders: a backend interface, a registry and a per-process model cache."""

from embedfleet.embedders.base import BatchStats, Embedder, plan_batches
from embedfleet.embedders.cache import get_embedder, load_count
from embedfleet.embedders.registry import backend_factory, known_backends, register

__all__ = ["BatchStats", "Embedder", "backend_factory", "get_embedder", "known_backends", "load_count", "plan_batches", "register"]
