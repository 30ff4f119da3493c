"""Several dispatchers beside one embedded store: a job whose store another process writes
waits queued, and runs when the store is free, instead of failing "being written by pid ...".

The other dispatcher is a real second process holding the store's writer lock, as a
dispatcher running a job on it does.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from embedfleet.schedulers.dispatcher import Dispatcher
from embedfleet.schedulers.service import JobService
from embedfleet.sinks.writer_lock import held_elsewhere
from tests import faults_helpers as fh

HOLD = """
import sys, time
from embedfleet.sinks.writer_lock import exclusive_writer
with exclusive_writer(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(uri: str, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, uri, str(seconds)], stdout=subprocess.PIPE, text=True,
                               env=fh.cli_env())
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_job_waits_queued_while_another_process_writes_its_store(tmp_path, docs_dir, fake_model, client):
    sink = f"chroma://{tmp_path / 'store'}"
    holder = _hold(sink, 6)
    try:
        assert held_elsewhere(sink) == f"pid {holder.pid}"
        with JobService(f"sqlite:///{tmp_path / 'jobs.db'}", data_dir=str(tmp_path / "data")) as service:
            job = service.submit(str(docs_dir), user="local", collection="kb", model="fake", sink=sink)
            seen: list[str] = []
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    seen.append(service.status(job.id, user="local").status)
                    time.sleep(0.2)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                started = time.monotonic()
                [done] = Dispatcher(service, client=client, poll_seconds=0.2).run(once=True)
            finally:
                stop.set()
                watcher.join()
            assert done.id == job.id and done.status == "succeeded", done.error
            # It was not even claimed while the other process held the store.
            assert time.monotonic() - started > 3
            assert seen[0] == "queued" and "failed" not in seen and "interrupted" not in seen
            assert holder.poll() is not None
    finally:
        holder.kill()
        holder.wait()
    stored = fh.read_chroma(sink, "local", "kb")
    assert len(stored) == done.chunks > 0


def test_held_elsewhere_is_none_for_this_process_and_for_servers(tmp_path):
    from embedfleet.sinks.writer_lock import exclusive_writer

    sink = f"chroma://{tmp_path / 'store'}"
    assert held_elsewhere(sink) is None
    with exclusive_writer(sink):
        assert held_elsewhere(sink) is None  # this process's jobs share its lock
    assert held_elsewhere("chroma://127.0.0.1:8000") is None


def test_embedfleet_index_still_fails_at_once(tmp_path, docs_dir, fake_model, client):
    """`embedfleet index` has no queue to wait in: it says who holds the store."""
    import embedfleet
    from embedfleet.errors import StoreBusy

    sink = f"chroma://{tmp_path / 'store'}"
    holder = _hold(sink, 30)
    try:
        with pytest.raises(StoreBusy, match=f"being written by pid {holder.pid}"):
            embedfleet.index(str(docs_dir), data_dir=str(tmp_path / "data"), sink=sink, client=client, model="fake")
    finally:
        holder.kill()
        holder.wait()
