"""Atomic partition outputs, on a local disk or an object store (:mod:`embedfleet.frames.storage`).

Local files are written under a temporary name, then renamed into place. An object is written
by one PUT of its whole bytes (there is no rename, and an interrupted PUT leaves nothing).

A partition is done exactly when its sidecar ``.json`` exists: the sidecar is written after the
Parquet file, so a crash at any instant leaves either a finished partition or one that will be
redone, never a half-written one that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from embedfleet.frames.storage import Remote, is_url, location

__all__ = [
    "copy_file",
    "exists",
    "is_done",
    "make_dirs",
    "parquet_rows",
    "read_json",
    "read_table",
    "remove_tree",
    "sidecar",
    "write_json_atomic",
    "write_table_atomic",
]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_table_atomic(table: pa.Table, path: str | os.PathLike | Remote) -> None:
    if is_url(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        _put(location(path), sink.getvalue().to_pybytes())
        return
    path = Path(path)
    tmp = _tmp(path)
    with _naming(path, tmp):
        pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: str | os.PathLike | Remote) -> None:
    if is_url(path):
        _put(location(path), json.dumps(obj).encode())
        return
    path = Path(path)
    tmp = _tmp(path)
    with _naming(path, tmp), open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _naming(path: Path, tmp: Path):
    """pyarrow's and file.write()'s OSErrors name no file, and a full disk must say where it is.
    The partial temporary file goes: left there, it keeps the disk full."""
    try:
        yield
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc


def read_json(path: str | os.PathLike | Remote) -> Any:
    if is_url(path):
        return json.loads(location(path).read_bytes())
    with open(path) as f:
        return json.load(f)


def read_table(path: str | os.PathLike | Remote, **kwargs: Any) -> pa.Table:
    """``pq.read_table`` of a local file, or of an object fetched by one GET."""
    if is_url(path):
        return pq.read_table(pa.BufferReader(location(path).read_bytes()), **kwargs)
    return pq.read_table(path, **kwargs)


def parquet_rows(path: str | os.PathLike | Remote) -> int:
    """A Parquet file's row count, from its footer."""
    if is_url(path):
        with location(path).open("rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    return pq.ParquetFile(path).metadata.num_rows


def sidecar(path: str | os.PathLike | Remote) -> Path | Remote:
    return location(f"{path}.json")


def is_done(path: str | os.PathLike | Remote) -> bool:
    if is_url(path):
        return _listed(location(f"{path}.json"))
    return sidecar(path).exists()


#: How long a listing of a prefix answers :func:`is_done` for the objects under it.
LISTING_SECONDS = 1.0
_listings: dict[Remote, tuple[float, frozenset[str]]] = {}
_listings_lock = threading.Lock()


def _listed(marker: Remote) -> bool:
    """Whether ``marker`` exists, from one listing of its prefix per :data:`LISTING_SECONDS`.

    A job resumed on S3 asks this of every partition at once: one LIST instead of a HEAD per
    partition. Markers are only ever added, so a listing never says done wrongly; one a moment
    old may miss a marker another process just wrote, and the partition is then submitted
    again, where its task finds the marker (or redoes the same output). This process's own
    writes drop the listing of their prefix.
    """
    folder, now = marker.parent, time.monotonic()
    with _listings_lock:
        cached = _listings.get(folder)
    if cached is None or now - cached[0] > LISTING_SECONDS:
        cached = (now, frozenset(p.name for p in folder.glob("*")))
        with _listings_lock:
            _listings[folder] = cached
    return marker.name in cached[1]


def _put(target: Remote, data: bytes) -> None:
    target.write_bytes(data)
    _forget(target.parent)


def _forget(folder: Remote) -> None:
    with _listings_lock:
        _listings.pop(folder, None)


def exists(path: str | os.PathLike | Remote) -> bool:
    return location(path).exists()


def make_dirs(path: str | os.PathLike | Remote) -> None:
    """The folder ``path`` (and its parents); nothing to make on an object store."""
    if not is_url(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def copy_file(source: str | os.PathLike | Remote, target: str | os.PathLike | Remote) -> None:
    """Copy one file, whole or not at all, between any two places."""
    if is_url(source) and is_url(target):
        location(source).copy_to(location(target))
        _forget(location(target).parent)
    elif not is_url(source) and not is_url(target):
        tmp = _tmp(Path(target))
        with _naming(Path(target), tmp):
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    elif is_url(target):
        _put(location(target), Path(source).read_bytes())
    else:
        tmp = _tmp(Path(target))
        with _naming(Path(target), tmp):
            tmp.write_bytes(location(source).read_bytes())
        os.replace(tmp, target)


def remove_tree(path: str | os.PathLike | Remote) -> None:
    """Remove a folder (or every object under a prefix); nothing there is fine."""
    if is_url(path):
        location(path).rmtree()
        with _listings_lock:
            _listings.clear()
    else:
        shutil.rmtree(path, ignore_errors=True)
