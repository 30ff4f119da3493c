"""Sinks by URI scheme: a dict of built-ins with an ``embedfleet.sinks`` entry-point fallback."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from embedfleet.errors import ConfigError, UnknownBackendError
from embedfleet.sinks.base import Sink, SinkSpec

__all__ = ["register", "known_schemes", "open_sink", "sink_class", "make_spec"]

# Values are "module:Class" strings so a scheme's client library is imported only when used.
_SINKS: dict[str, str | Callable[[SinkSpec], Sink]] = {
    "chroma": "embedfleet.sinks.chroma:ChromaSink",
    "milvus": "embedfleet.sinks.milvus:MilvusSink",
    "parquet": "embedfleet.sinks.parquet:ParquetSink",
}


def register(scheme: str, factory: str | Callable[[SinkSpec], Sink]) -> None:
    _SINKS[scheme] = factory


def _entry_point(scheme: str):
    for ep in entry_points(group="embedfleet.sinks"):
        if ep.name == scheme:
            return ep.load()
    return None


def known_schemes() -> list[str]:
    return sorted(set(_SINKS) | {ep.name for ep in entry_points(group="embedfleet.sinks")})


def sink_class(scheme: str):
    factory = _SINKS.get(scheme)
    if factory is None:
        factory = _entry_point(scheme)
    if factory is None:
        raise UnknownBackendError("sink scheme", scheme, known_schemes())
    if isinstance(factory, str):
        import importlib

        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    return factory


def make_spec(uri: str, options: Mapping[str, Any] | None = None) -> SinkSpec:
    """A SinkSpec with the scheme's config section (``embedfleet.sinks.<scheme>``) folded in.

    Built on the client: workers never read dask.config.
    """
    scheme = urlsplit(uri).scheme
    if not scheme:
        raise ConfigError(f"sink {uri!r} is not a URI; e.g. chroma:///abs/dir, milvus:///abs/file.db, parquet:///abs/dir")
    sink_class(scheme)  # fail early on an unknown scheme
    import dask.config

    merged = dict(dask.config.get(f"embedfleet.sinks.{scheme}", {}) or {})
    merged.update(options or {})
    return SinkSpec(uri=uri, options=tuple(sorted((k.replace("_", "-"), _freeze(v)) for k, v in merged.items())))


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def open_sink(spec: SinkSpec | str) -> Sink:
    if isinstance(spec, str):
        spec = make_spec(spec)
    return sink_class(urlsplit(spec.uri).scheme)(spec)
