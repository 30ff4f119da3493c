"""Embedder backends by name.

A name is looked up, in order, among the backends :func:`register`-ed in this process (the
built-ins are registered here), the ``embedfleet.backends`` config key (name ->
``"module:Class"``), and the ``embedfleet.embedders`` entry-point group. The config key is
the way to add a backend without packaging it: the client puts the name's ``"module:Class"``
in the job's spec (``EmbedderSpec.backend_path``, :func:`embedfleet.config.embedder_spec`),
so workers only need the module to be importable; they never read config. A ``Class`` is called with the :class:`~embedfleet.config.EmbedderSpec`.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import Callable

from embedfleet import config
from embedfleet.config import EmbedderSpec
from embedfleet.embedders.base import Embedder
from embedfleet.errors import ConfigError, UnknownBackendError

__all__ = ["register", "known_backends", "check_backend", "backend_factory", "backend_modules", "job_backend_modules"]

# "module:Class" strings, so torch or onnxruntime are imported only by the backend that needs them.
_BACKENDS: dict[str, str | Callable[[EmbedderSpec], Embedder]] = {
    "sentence-transformers": "embedfleet.embedders.sentence_transformers:SentenceTransformerEmbedder",
    "onnx": "embedfleet.embedders.onnx:OnnxEmbedder",
    "openvino": "embedfleet.embedders.openvino:OpenVinoEmbedder",
    "openai": "embedfleet.embedders.openai:OpenAIEmbedder",
}


def register(name: str, factory: str | Callable[[EmbedderSpec], Embedder]) -> None:
    """Add a backend to this process only (its workers need it too: prefer ``embedfleet.backends``)."""
    _BACKENDS[name] = factory


@functools.lru_cache(maxsize=1)
def _entry_point_names() -> frozenset[str]:
    # Scanning installed distributions costs milliseconds; job submission calls this per job.
    return frozenset(ep.name for ep in entry_points(group="embedfleet.embedders"))


def _configured() -> dict[str, str]:
    return dict(config.get("backends", None) or {})


def known_backends() -> list[str]:
    return sorted(set(_BACKENDS) | set(_configured()) | _entry_point_names())


def check_backend(name: str) -> None:
    """Refuse, listing the known ones, a backend name no module registered (before a job is queued)."""
    if name not in known_backends():
        raise UnknownBackendError("embedder backend", name, known_backends())


def backend_factory(name: str, path: str | None = None) -> Callable[[EmbedderSpec], Embedder]:
    """The factory of backend ``name``; ``path`` is the spec's ``"module:Class"`` for it, if any.

    A backend registered in this process wins over ``path``, so a worker preload can replace
    one (tests slow the fake embedder down that way).
    """
    factory = _BACKENDS.get(name) or path or _configured().get(name)
    if factory is None:
        for ep in entry_points(group="embedfleet.embedders"):
            if ep.name == name:
                factory = ep.load()
                break
    if factory is None:
        raise UnknownBackendError("embedder backend", name, known_backends())
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"embedder backend {name!r}: cannot load {factory!r} ({exc})") from exc
    return factory


def backend_modules(name: str) -> tuple[str, ...]:
    """What loading a model of backend ``name`` imports: its factory's ``warm_modules``.

    Each backend says so itself (a registered, configured or entry-point backend too), so
    that a worker can import them before its first task (:mod:`embedfleet.embedders.warm`,
    the forkserver of :mod:`embedfleet.pipeline.cluster`); none means nothing to import early.
    """
    return tuple(getattr(backend_factory(name), "warm_modules", ()))


def job_backend_modules(*, backend: str | None = None, model: str | None = None) -> tuple[str, ...]:
    """:func:`backend_modules` of the backend jobs will use: ``backend``, else ``embed.backend``, else ``model``'s.

    Empty when that backend cannot be resolved: the job then fails with the proper error on its own.
    """
    try:
        return backend_modules(backend or config.get("embed.backend") or config.model_spec(model).backend)
    except Exception:  # noqa: BLE001 - an unknown or broken backend is the job's error to report
        return ()
