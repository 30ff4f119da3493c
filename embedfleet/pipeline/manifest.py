"""The per-collection manifest: which chunk ids (of which documents) the sink holds.

Incremental modes compare a job's chunk ids with it (DESIGN §6). It is a Parquet dataset of
``doc_id, chunk_id`` kept in versions: ``CURRENT`` names the live version and is replaced
atomically when a job commits, so a crash leaves either the old manifest or the new one.
It lives in the data dir, keyed by the sink URI and the physical collection name.

On an object store ``CURRENT`` is one object, overwritten by one PUT: a reader sees the old
version's name or the new one's, never a mix, which is all the switch needs.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from embedfleet.errors import CorruptManifest
from embedfleet.frames.io import read_json, remove_tree, write_json_atomic
from embedfleet.frames.storage import Remote, location

__all__ = ["Manifest"]


class Manifest:
    def __init__(self, data_dir: str, sink_uri: str, physical_name: str):
        sink_key = hashlib.sha1(sink_uri.encode()).hexdigest()[:12]
        self.root = location(data_dir) / "manifests" / sink_key / physical_name
        self._pointer = self.root / "CURRENT"

    @property
    def current(self) -> Path | Remote | None:
        """The live version, or None for a collection no job committed to.

        A damaged ``CURRENT`` raises :class:`CorruptManifest` saying where it is: guessing
        would either re-embed everything or never delete a stale chunk again.
        """
        if not self._pointer.exists():
            return None
        try:
            name = read_json(self._pointer)["version"]
            if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
                raise ValueError(f"not a version name: {name!r}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptManifest(
                f"the manifest of collection {self.root.name!r} is corrupt ({self._pointer}: {exc}); "
                "run the job with --mode full to rebuild it from the store"
            ) from None
        path = self.root / name
        # A prefix exists only while objects lie under it: an empty version is still the live one.
        return path if isinstance(path, Remote) or path.exists() else None

    def current_if_readable(self) -> Path | Remote | None:
        """:attr:`current`, or None where it is damaged (mode full rebuilds it)."""
        try:
            return self.current
        except CorruptManifest:
            return None

    def files(self) -> list[str]:
        current = self.current
        return sorted(str(p) for p in current.glob("*.parquet")) if current else []

    def new_version(self, job_id: str) -> Path | Remote:
        """A fresh directory for the job's next manifest, never an existing one.

        A job killed after ``CURRENT`` was switched to its version but before it recorded its
        commit runs its commit again when resumed: that must not delete the live version (an
        append reads it to build the next one, and a second crash would leave ``CURRENT``
        pointing at nothing, so the collection's chunks would never be deleted again).
        """
        path = self.root / f"v-{job_id}-{uuid.uuid4().hex[:8]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, version: Path | Remote) -> None:
        previous = self.current_if_readable()
        write_json_atomic({"version": version.name}, self._pointer)
        if previous is not None and previous != version:
            remove_tree(previous)
        # What earlier, crashed commits of the same job left behind (never made current).
        job_prefix = version.name.rsplit("-", 1)[0]
        for leftover in self.root.glob(f"{job_prefix}-*"):
            if leftover != version:
                remove_tree(leftover)

    def drop(self) -> None:
        remove_tree(self.root)
