"""The per-collection manifest: which chunk ids (of which documents) the sink holds.

Incremental modes compare a job's chunk ids with it (DESIGN §6). It is a Parquet dataset of
``doc_id, chunk_id`` kept in versions: ``CURRENT`` names the live version and is replaced
atomically when a job commits, so a crash leaves either the old manifest or the new one.
It lives in the data dir, keyed by the sink URI and the physical collection name.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from embedfleet.tasks.io import read_json, write_json_atomic

__all__ = ["Manifest"]


class Manifest:
    def __init__(self, data_dir: str, sink_uri: str, physical_name: str):
        sink_key = hashlib.sha1(sink_uri.encode()).hexdigest()[:12]
        self.root = Path(data_dir) / "manifests" / sink_key / physical_name
        self._pointer = self.root / "CURRENT"

    @property
    def current(self) -> Path | None:
        if not self._pointer.exists():
            return None
        path = self.root / read_json(self._pointer)["version"]
        return path if path.exists() else None

    def files(self) -> list[str]:
        current = self.current
        return sorted(str(p) for p in current.glob("*.parquet")) if current else []

    def new_version(self, job_id: str) -> Path:
        path = self.root / f"v-{job_id}"
        if path.exists():
            shutil.rmtree(path)  # a crashed commit of this same job: rebuild it
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, version: Path) -> None:
        previous = self.current
        write_json_atomic({"version": version.name}, self._pointer)
        if previous is not None and previous != version:
            shutil.rmtree(previous, ignore_errors=True)

    def drop(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
