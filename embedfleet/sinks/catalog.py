"""Per-user collections on any sink: the only way user-facing names reach a store.

Every function takes ``(user, collection)`` and maps it through
:func:`embedfleet.sinks.naming.physical_name`, and listing keeps only names that
:func:`~embedfleet.sinks.naming.parse_physical_name` gives back for that user, so one user
can never name, see or drop another user's collection.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from embedfleet.errors import SinkError
from embedfleet.sinks.base import CollectionInfo, Sink, SinkCollection
from embedfleet.sinks.naming import parse_physical_name, physical_name

__all__ = [
    "default_sink_uri",
    "display_uri",
    "open_user_collection",
    "list_user_collections",
    "describe_user_collection",
    "drop_user_collection",
]


def default_sink_uri(data_dir: str | None = None) -> str:
    """Config ``embedfleet.sink``, else the embedded Chroma store ``chroma://<data-dir>/chroma``."""
    from embedfleet import config

    configured = config.get("sink", None)
    if configured:
        return str(configured)
    return f"chroma://{config.local_dir(data_dir) / 'chroma'}"


def display_uri(uri: str) -> str:
    """``uri`` without any user:password part, for messages and output."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def open_user_collection(
    sink: Sink, user: str, collection: str, *, info: CollectionInfo | None = None, create: bool = False
) -> SinkCollection:
    name = physical_name(user, collection)
    try:
        return sink.open(name, info=info, create=create)
    except SinkError as exc:
        if not create and name not in sink.list_collections():
            raise SinkError(f"user {user!r} has no collection {collection!r} in {display_uri(sink.uri)}") from exc
        raise


def list_user_collections(sink: Sink, user: str) -> list[str]:
    """The user's collection names (user-facing), sorted."""
    physical_name(user, "x")  # validates the user id
    names = []
    for name in sink.list_collections():
        parsed = parse_physical_name(name)
        if parsed is not None and parsed[0] == user:
            names.append(parsed[1])
    return sorted(names)


def describe_user_collection(sink: Sink, user: str, collection: str) -> dict[str, Any]:
    opened = open_user_collection(sink, user, collection)
    info = opened.info
    return {
        "name": collection,
        "user": user,
        "physical_name": opened.name,
        "sink": display_uri(sink.uri),
        **info.describe(),
        "count": opened.count(),
    }


def drop_user_collection(sink: Sink, user: str, collection: str) -> str:
    """Drop the user's collection; returns its physical name."""
    name = physical_name(user, collection)
    if name not in sink.list_collections():
        raise SinkError(f"user {user!r} has no collection {collection!r} in {display_uri(sink.uri)}")
    sink.drop(name)
    return name
