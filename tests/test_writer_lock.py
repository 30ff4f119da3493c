"""An embedded store takes one writing process; threads of one process share it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from embedfleet.errors import SinkError
from embedfleet.sinks.writer_lock import exclusive_writer, lock_path


def test_server_stores_need_no_lock():
    assert lock_path("chroma://127.0.0.1:8000") is None
    assert lock_path("milvus://milvus.internal:19530") is None


def test_threads_of_one_process_share_the_lock(tmp_path):
    uri = f"chroma://{tmp_path}/chroma"
    with exclusive_writer(uri), exclusive_writer(uri):
        assert lock_path(uri).exists()
    with exclusive_writer(uri):  # released and taken again
        pass


def test_another_process_is_refused_naming_the_holder(tmp_path):
    uri = f"milvus://{tmp_path}/vectors.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from embedfleet.sinks.writer_lock import exclusive_writer
            with exclusive_writer({uri!r}):
                print("held", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SinkError, match=f"pid {holder.pid}.*server store"):
            with exclusive_writer(uri):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_writer(uri):  # the lock died with its process
        pass
