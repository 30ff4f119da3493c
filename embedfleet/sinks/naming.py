"""Physical collection names: an injective, validated map from (user, collection).

Both parts are validated (1-60 of ``[a-z0-9_-]``, starting alphanumeric). Each part is
escaped so that ``_`` becomes ``_u`` and ``-`` becomes ``_d``; after escaping every ``_`` is
followed by ``u`` or ``d``, so ``__`` can only be the separator and the map is injective. The
result uses only ``[a-z0-9_]``, starts with a letter, ends alphanumeric and is at most 245
characters: legal for Chroma (3-512 chars of ``[a-zA-Z0-9._-]``) and Milvus (letters, digits
and ``_``, at most 255, starting with a letter or ``_``).
"""

from __future__ import annotations

import re

from embedfleet.errors import ConfigError

__all__ = ["physical_name", "parse_physical_name", "check_part", "PREFIX"]

PREFIX = "ef_"
_PART = re.compile(r"^[a-z0-9][a-z0-9_-]{0,59}$")


def check_part(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _PART.match(value):
        raise ConfigError(
            f"invalid {kind} {value!r}: use 1-60 lowercase letters, digits, '-' or '_', starting with a letter or digit"
        )
    return value


def _escape(part: str) -> str:
    return part.replace("_", "_u").replace("-", "_d")


def _unescape(part: str) -> str:
    return re.sub(r"_([ud])", lambda m: "_" if m.group(1) == "u" else "-", part)


def physical_name(user: str, collection: str) -> str:
    check_part("user id", user)
    check_part("collection name", collection)
    return f"{PREFIX}{_escape(user)}__{_escape(collection)}"


def parse_physical_name(name: str) -> tuple[str, str] | None:
    """(user, collection) for a name made by :func:`physical_name`, else None."""
    if not name.startswith(PREFIX):
        return None
    body = name[len(PREFIX):]
    user, sep, collection = body.partition("__")
    if not sep or not user or not collection:
        return None
    try:
        pair = (_unescape(user), _unescape(collection))
        return pair if physical_name(*pair) == name else None
    except ConfigError:
        return None
