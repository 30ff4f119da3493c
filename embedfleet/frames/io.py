"""Atomic partition outputs: written under a temporary name, then renamed into place.

A partition is done exactly when its sidecar ``.json`` exists: the sidecar is renamed into
place after the Parquet file, so a crash at any instant leaves either a finished partition
or one that will be redone, never a half-written one that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["write_table_atomic", "write_json_atomic", "read_json", "is_done", "sidecar"]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = _tmp(path)
    with _naming(path, tmp):
        pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
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


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def sidecar(path: str | os.PathLike) -> Path:
    return Path(f"{path}.json")


def is_done(path: str | os.PathLike) -> bool:
    return sidecar(path).exists()
