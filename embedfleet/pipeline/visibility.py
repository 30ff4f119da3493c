"""Before a job's first task: does every worker see the job's data dir and its source?

A worker on another machine whose data dir is a node-local folder would otherwise fail in the
middle of the job with a bare ``FileNotFoundError`` on some ``.tmp`` file, or (with folders
mirrored but not files) the driver would fail reading a chunk file only that worker wrote. So
the driver writes a token into the job dir and runs one small task on each worker that reads
it back and looks for the source; any worker that cannot gets one clear line.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from embedfleet.errors import JobError
from embedfleet.frames.io import read_json, write_json_atomic
from embedfleet.frames.storage import is_url, location

__all__ = ["check_workers_see", "probe"]

SHARED_STORAGE = "use shared storage or an object-store data dir (s3://...)"
PROBE_PRIORITY = 1_000_000


def probe(token_path: str, token: str, source: str | None) -> str | None:
    """On a worker: why it cannot use the job's files, or None. ``source``: a local path or URL."""
    try:
        seen = read_json(token_path).get("token")
    except (OSError, ValueError):
        seen = None
    if seen != token:
        return f"data dir {location(token_path).parent.parent.parent}"
    if source is not None:
        try:
            visible = location(source).exists() if is_url(source) else os.path.exists(source)
        except OSError:
            visible = False
        if not visible:
            return f"source {source}"
    return None


def check_workers_see(client: Any, *, token_path: Any, source: str | None, priority: int = 0) -> None:
    """Run :func:`probe` once on every worker of ``client``; raise :class:`JobError` naming the
    first worker that cannot see the data dir or the source."""
    token = uuid.uuid4().hex
    write_json_atomic({"token": token}, token_path)
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    futures = {
        # Ahead of every queued task (it takes milliseconds): a job starting beside others on a
        # busy cluster waits only for a free thread on each worker, not for their queues.
        client.submit(probe, str(token_path), token, source, workers=[w], allow_other_workers=False, pure=False,
                      priority=priority + PROBE_PRIORITY, key=f"embedfleet-probe-{token[:8]}-{i}"): w
        for i, w in enumerate(workers)
    }
    problems = {futures[f]: f.result() for f in futures}
    for worker, problem in sorted(problems.items()):
        if problem is not None:
            raise JobError(f"worker {worker} cannot see {problem}: {SHARED_STORAGE}")
