"""One writing process per embedded store.

Chroma's PersistentClient and Milvus Lite keep state in the process that opened them; two
processes writing one store can corrupt it. A job writing an embedded store holds an
exclusive ``flock`` on a lock file beside the store for its duration. Threads of one process
(a dispatcher running several jobs) share the process's lock; another process is refused
with :class:`StoreBusy` naming the holder, and told to use a server store for shared writes.
A dispatcher asks :func:`held_elsewhere` before it claims a job, so with several dispatchers a
job whose store is busy waits queued instead of failing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from embedfleet.errors import StoreBusy

__all__ = ["exclusive_writer", "held_elsewhere", "lock_path"]

_lock = threading.Lock()
_held: dict[str, list] = {}  # lock path -> [file object, holders in this process]


def lock_path(uri: str) -> Path | None:
    """The lock file of an embedded store URI (a directory or a file), None for servers."""
    parts = urlsplit(uri)
    if parts.netloc or not parts.path:
        return None
    path = Path(parts.path)
    return path / ".embedfleet-writer.lock" if path.is_dir() or not path.suffix else path.with_name(path.name + ".embedfleet-writer.lock")


def held_elsewhere(uri: str) -> str | None:
    """Who holds the writer lock of the embedded store ``uri``, if another process does; else None.

    Taken and let go at once when free: the answer may be stale by the time it is used, and
    :func:`exclusive_writer` still decides (its :class:`StoreBusy` requeues a dispatched job).
    """
    path = lock_path(uri)
    if path is None or not path.exists():
        return None
    with _lock:
        if str(path) in _held:
            return None  # this process holds it: its jobs share it
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                return handle.read().strip() or "another process"
            fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def exclusive_writer(uri: str) -> Iterator[None]:
    path = lock_path(uri)
    if path is None:
        yield
        return
    key = str(path)
    with _lock:
        entry = _held.get(key)
        if entry is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise StoreBusy(
                    f"the embedded store {uri} is being written by {holder}; an embedded store takes one "
                    "writing process at a time (run jobs through one dispatcher, or use a server store "
                    "such as chroma://host:port or milvus://host:port for concurrent writers)"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            entry = _held[key] = [handle, 0]
        entry[1] += 1
    try:
        yield
    finally:
        with _lock:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                entry[0].close()
