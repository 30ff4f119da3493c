"""Before a job's first task: does every worker see the job's data dir and its source?

A worker on another machine whose data dir is a node-local folder would otherwise fail in the
middle of the job with a bare ``FileNotFoundError`` on some ``.tmp`` file, or (with folders
mirrored but not files) the driver would fail reading a chunk file only that worker wrote. So
the driver writes a token into the job dir and runs one small task on each worker that reads
it back and looks for the source; any worker that cannot gets one clear line.

Whether a worker sees the data dir is a fact about that worker process and the data dir, not
about the job: once every worker of a cluster has read a token back, later jobs on the same
workers (the same addresses and scratch folders, so no restarted or new worker) and the same
data dir skip the token and its wait. Only their source is still probed, and the job does not
wait for that before its first task: :meth:`Visibility.verify` is called before any task's
result is used, and a task that failed because its worker cannot see the source is reported
as that one line. The first job on a worker set still stops before any task runs.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

from embedfleet.errors import JobError
from embedfleet.frames.io import read_json, write_json_atomic
from embedfleet.frames.storage import is_url, location

__all__ = ["Visibility", "check_workers_see", "probe", "start_check"]

SHARED_STORAGE = "use shared storage or an object-store data dir (s3://...)"
PROBE_PRIORITY = 1_000_000
#: How long a job waits for a deferred source probe before it gives up on the cluster.
VERIFY_TIMEOUT_SECONDS = 300.0

# (scheduler, data dir, the workers' identities) whose every worker read a token back.
_seen_data_dirs: set[tuple[str, str, frozenset]] = set()
_seen_lock = threading.Lock()


def probe(token_path: str, token: str | None, source: str | None) -> str | None:
    """On a worker: why it cannot use the job's files, or None. ``source``: a local path or URL.
    ``token`` None: the data dir is already known to be visible; only the source is looked for."""
    if token is not None:
        try:
            seen = read_json(token_path).get("token")
        except (OSError, ValueError):
            seen = None
        if seen != token:
            return f"data dir {_data_dir(token_path)}"
    if source is not None:
        try:
            visible = location(source).exists() if is_url(source) else os.path.exists(source)
        except OSError:
            visible = False
        if not visible:
            return f"source {source}"
    return None


def _data_dir(token_path: Any):
    return location(str(token_path)).parent.parent.parent  # <data dir>/jobs/<job id>/visible.json


class Visibility:
    """A started check; :meth:`verify` waits for it and raises :class:`JobError` naming the
    first worker that cannot see what it needs. Verifying again costs nothing."""

    def __init__(self, futures: dict, *, remember: tuple | None = None):
        #: Whether the job must wait for the answer before its first task: the token is new.
        self.gates = remember is not None
        self._futures = futures  # future -> worker address
        self._remember = remember
        self._error: JobError | None = None
        self._done = not futures

    def verify(self, timeout: float | None = VERIFY_TIMEOUT_SECONDS) -> None:
        if not self._done:
            problems = {self._futures[f]: f.result(timeout=timeout) for f in self._futures}
            self._futures = {}
            self._done = True
            for worker, problem in sorted(problems.items()):
                if problem is not None:
                    self._error = JobError(f"worker {worker} cannot see {problem}: {SHARED_STORAGE}")
                    break
            if self._error is None and self._remember is not None:
                with _seen_lock:
                    _seen_data_dirs.add(self._remember)
        if self._error is not None:
            raise self._error


def start_check(client: Any, *, token_path: Any, source: str | None, priority: int = 0) -> Visibility:
    """Start :func:`probe` on every worker of ``client``; the data dir part only where this
    process has not yet seen these very workers read a token from this data dir."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    # The scratch folder is unique to a worker process: a restarted worker is a new one.
    identity = frozenset((address, str(info.get("local_directory"))) for address, info in workers.items())
    key = (str(getattr(client.scheduler, "address", client)), str(_data_dir(token_path)), identity)
    with _seen_lock:
        seen = key in _seen_data_dirs
    if seen and source is None:
        return Visibility({})
    token = None if seen else uuid.uuid4().hex
    if token is not None:
        write_json_atomic({"token": token}, token_path)
    tag = token[:8] if token is not None else uuid.uuid4().hex[:8]
    futures = {
        # Ahead of every queued task (it takes milliseconds): a job starting beside others on a
        # busy cluster waits only for a free thread on each worker, not for their queues.
        client.submit(probe, str(token_path), token, source, workers=[w], allow_other_workers=False, pure=False,
                      priority=priority + PROBE_PRIORITY, key=f"embedfleet-probe-{tag}-{i}"): w
        for i, w in enumerate(sorted(workers))
    }
    return Visibility(futures, remember=None if seen else key)


def check_workers_see(client: Any, *, token_path: Any, source: str | None, priority: int = 0) -> None:
    """Run :func:`probe` on every worker of ``client`` and wait; raise :class:`JobError` naming
    the first worker that cannot see the data dir or the source."""
    start_check(client, token_path=token_path, source=source, priority=priority).verify()
