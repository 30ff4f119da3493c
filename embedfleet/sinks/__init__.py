"""Vector stores behind one contract: see :mod:`embedfleet.sinks.base`."""

from embedfleet.sinks.base import CollectionInfo, Hit, Sink, SinkCollection, SinkSpec
from embedfleet.sinks.naming import parse_physical_name, physical_name
from embedfleet.sinks.registry import known_schemes, make_spec, open_sink, register

__all__ = [
    "CollectionInfo",
    "Hit",
    "Sink",
    "SinkCollection",
    "SinkSpec",
    "known_schemes",
    "make_spec",
    "open_sink",
    "parse_physical_name",
    "physical_name",
    "register",
]
