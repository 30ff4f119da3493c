"""Where job files and sources live: a local path, or an fsspec URL (``s3://``, ``gs://``, ``abfs://``).

Local paths stay :class:`pathlib.Path` and plain ``os`` calls, exactly as before (and as fast).
A URL becomes a :class:`Remote`, which answers the few questions the pipeline asks of a path
(``/``, ``name``, ``exists()``, ``glob()``, ...) through the URL's fsspec filesystem, so the job
dir and the manifest are named once for both (:mod:`embedfleet.pipeline.jobdir`).

Object stores have no rename, so "complete or absent" is kept differently there
(:mod:`embedfleet.frames.io`): every object is written by one PUT of its whole bytes, which a
reader sees whole or not at all, and a partition's completion marker is written after its data.

Credentials and endpoints are never part of a job: each process that touches a URL finds them
where the store's own client looks (for S3: ``AWS_*`` environment variables including
``AWS_ENDPOINT_URL``, ``~/.aws`` profiles, instance roles), plus ``embedfleet.storage.options``
of *its own* dask config (per protocol: ``{s3: {endpoint_url: ...}}``), so a worker uses
its own. Listings are never cached: another process's markers must be seen at once.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "Remote",
    "filesystem",
    "is_url",
    "location",
    "object_version",
    "protocol_of",
    "storage_options",
]

def is_url(path: Any) -> bool:
    """Whether ``path`` names an object (``s3://b/k``) rather than a local file (``file://`` is local)."""
    if isinstance(path, Remote):
        return True
    if isinstance(path, os.PathLike):
        return False
    text = str(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def protocol_of(url: str) -> str:
    return str(url).partition("://")[0]


def location(path: Any) -> Path | Remote:
    """``path`` as the object its operations go through: a Path, or a :class:`Remote` for a URL."""
    if isinstance(path, (Path, Remote)):
        return path
    if is_url(path):
        return Remote(str(path))
    if str(path).startswith("file://"):
        return Path(str(path)[len("file://"):])
    return Path(path)


def storage_options(protocol: str) -> dict[str, Any]:
    """This process's ``embedfleet.storage.options.<protocol>`` (read here, never sent in a job)."""
    import dask.config

    options = dask.config.get(f"embedfleet.storage.options.{protocol}", None) or {}
    return {str(k).replace("-", "_"): v for k, v in dict(options).items()}


def _options_key(protocol: str) -> str:
    return json.dumps(storage_options(protocol), sort_keys=True, default=str)


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, options_key: str):
    import fsspec

    options = json.loads(options_key)
    if protocol in ("s3", "s3a"):
        # A marker another process wrote a moment ago must not be hidden by an old listing.
        options.setdefault("use_listings_cache", False)
    return fsspec.filesystem(protocol, **options)


def filesystem(url: str):
    """The fsspec filesystem of ``url``'s protocol, one per process and set of options."""
    protocol = protocol_of(url)
    return _filesystem(protocol, _options_key(protocol))


def _strip(url: str):
    fs = filesystem(url)
    return fs, fs._strip_protocol(url)


def object_version(info: dict[str, Any]) -> str:
    """What changes when an object is rewritten: its ETag (S3), generation/md5 (GCS), else its mtime."""
    for key in ("ETag", "etag", "generation", "md5Hash", "content_md5", "LastModified", "last_modified", "mtime",
                "updated", "created"):
        value = info.get(key)
        if value not in (None, ""):
            return str(value).strip('"')
    return ""


class Remote:
    """An object or prefix by URL, with the slice of the :class:`pathlib.Path` API the pipeline uses.

    A prefix is a folder only by convention: ``mkdir`` makes nothing and ``exists`` on a
    prefix is true once any object lies under it.
    """

    __slots__ = ("url",)

    def __init__(self, url: str):
        scheme, _, rest = str(url).partition("://")
        self.url = f"{scheme}://{rest.rstrip('/')}"

    def __truediv__(self, part: str | os.PathLike) -> Remote:
        return Remote(f"{self.url}/{os.fspath(part).strip('/')}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: Remote) -> bool:
        return self.url < other.url

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> Remote:
        head = self.url.rsplit("/", 1)[0]
        return Remote(head) if "://" in head and head.split("://", 1)[1] else self

    def with_name(self, name: str) -> Remote:
        return self.parent / name

    def exists(self) -> bool:
        fs, path = _strip(self.url)
        return fs.exists(path)

    def is_file(self) -> bool:
        fs, path = _strip(self.url)
        return fs.isfile(path)

    def is_dir(self) -> bool:
        fs, path = _strip(self.url)
        return fs.isdir(path)

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make: an object store's folders are the prefixes of its objects."""

    def info(self) -> dict[str, Any]:
        fs, path = _strip(self.url)
        return fs.info(path)

    def glob(self, pattern: str) -> Iterator[Remote]:
        """Objects directly under this prefix whose names match ``pattern`` (no ``**``)."""
        fs, path = _strip(self.url)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return iter(())
        scheme = protocol_of(self.url)
        found = [n for n in names if fnmatch.fnmatchcase(n.rstrip("/").rsplit("/", 1)[-1], pattern)]
        return iter(sorted(Remote(f"{scheme}://{n}") for n in found))

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = _strip(self.url)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        fs, path = _strip(self.url)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def read_bytes(self) -> bytes:
        fs, path = _strip(self.url)
        return fs.cat_file(path)

    def write_bytes(self, data: bytes) -> None:
        """One PUT of the whole object: readers see the old object, or all of the new one."""
        fs, path = _strip(self.url)
        fs.pipe_file(path, data)

    def open(self, mode: str = "rb", **kwargs: Any):
        fs, path = _strip(self.url)
        return fs.open(path, mode, **kwargs)

    def copy_to(self, target: Remote) -> None:
        """A server-side copy where the store has one (S3 CopyObject: atomic like a PUT)."""
        fs, path = _strip(self.url)
        fs.copy(path, fs._strip_protocol(target.url))
