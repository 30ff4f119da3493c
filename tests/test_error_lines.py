"""Every failure is one clear line on stderr, its traceback only with -v (issue 14, item 6).

Each test runs ``python -m embedfleet.cli`` in a real subprocess, so what is checked is what a
user's terminal shows: the CLI's own logging, Dask's loggers in the CLI process and in the
worker processes of the LocalCluster it starts, and the store clients'. The full disk is a
real one: a 1 MiB tmpfs (as root; skipped where mounting is not allowed).
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading

import pytest

from tests import faults_helpers as fh
from tests.sink_servers import free_port


@pytest.fixture
def config_dir(tmp_path):
    return fh.write_dask_config(tmp_path / "dask-config")


@pytest.fixture
def corpus(tmp_path):
    return fh.make_corpus(tmp_path / "corpus", documents=6, words=400, seed=3)[0].parent


@pytest.fixture
def small_disk(tmp_path):
    """A mounted 1 MiB tmpfs: writes past it fail with ENOSPC, as on a full disk."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def _error_line(outcome: subprocess.CompletedProcess) -> str:
    assert outcome.returncode != 0, outcome.stdout + outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), outcome.stderr
    return lines[0]


def _traced(outcome: subprocess.CompletedProcess) -> None:
    assert outcome.returncode != 0, outcome.stdout + outcome.stderr
    assert "Traceback (most recent call last)" in outcome.stderr, outcome.stderr
    assert "NoneType: None" not in outcome.stderr, outcome.stderr


@pytest.mark.slow
def test_a_full_disk_is_one_line(tmp_path, small_disk, config_dir):
    # 2 MB of text: its chunk and embedding files do not fit in the 1 MiB data dir. The job
    # database is elsewhere: were it on the full disk too, the job's record could not be
    # updated either, and that is a failure of its own, reported on a line of its own.
    corpus = tmp_path / "big-corpus"
    fh.make_corpus(corpus, documents=40, words=10000, seed=1)
    data_dir = small_disk / "data"
    args = ["index", str(corpus), "--model", "fake", "--workers", "1", "--data-dir", str(data_dir),
            "--db", f"sqlite:///{tmp_path / 'jobs.db'}", "--sink", f"chroma://{tmp_path / 'chroma'}"]
    env = fh.cli_env(config_dir)

    quiet = fh.run_cli(*args, env=env, cwd=tmp_path)
    line = _error_line(quiet)
    assert line.startswith(f"Error: no space left on device writing {data_dir}/jobs/"), line

    loud = fh.run_cli("-v", *args, env=env, cwd=tmp_path)
    _traced(loud)
    assert "No space left on device" in loud.stderr


@pytest.mark.slow
def test_a_failed_dispatched_job_is_one_line(tmp_path, small_disk, config_dir):
    # The dispatcher's log is where a job it runs reports its failure: once, without the
    # stray "NoneType: None" of an exc_info=True outside the except clause.
    corpus = tmp_path / "big-corpus"
    fh.make_corpus(corpus, documents=40, words=10000, seed=1)
    data_dir = small_disk / "data"
    where = ["--data-dir", str(data_dir), "--db", f"sqlite:///{tmp_path / 'jobs.db'}"]
    env = fh.cli_env(config_dir)
    for verbose in ((), ("-v",)):
        shutil.rmtree(data_dir / "jobs", ignore_errors=True)  # the last run's files filled the disk
        submitted = fh.run_cli("jobs", "submit", str(corpus), "--model", "fake", "--sink",
                               f"chroma://{tmp_path / 'chroma'}", *where, env=env, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        ran = fh.run_cli(*verbose, "jobs", "run", "--once", "--workers", "1", *where, env=env, cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        failed = [line for line in ran.stderr.splitlines() if " failed: " in line]
        assert len(failed) == 1 and "No space left on device" in failed[0], ran.stderr
        assert "NoneType: None" not in ran.stderr, ran.stderr
        # Dask's own report of each failed attempt, and the traceback, only with -v.
        assert ("Compute Failed" in ran.stderr) == bool(verbose), ran.stderr
        assert ("Traceback (most recent call last)" in ran.stderr) == bool(verbose), ran.stderr


@pytest.mark.slow
def test_a_failed_job_says_its_error_once(tmp_path, corpus, config_dir):
    port = free_port()  # nothing listens there
    args = ["index", str(corpus), "--model", "fake", "--workers", "1", "--data-dir", str(tmp_path / "data"),
            "--sink", f"chroma://127.0.0.1:{port}"]
    env = fh.cli_env(config_dir)

    line = _error_line(fh.run_cli(*args, env=env, cwd=tmp_path))
    assert line.startswith(f"Error: cannot connect to Chroma at chroma://127.0.0.1:{port}: "), line
    assert "Connection refused" in line

    _traced(fh.run_cli("-v", *args, env=env, cwd=tmp_path))


class _EmptyServerError(http.server.BaseHTTPRequestHandler):
    """An HTTP server that answers every request 500 with no body (a proxy in front of a Chroma
    that is down): chromadb then raises ``ValueError('')``."""

    def _fail(self):
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _fail

    def log_message(self, *args):
        pass


@pytest.fixture
def empty_500_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EmptyServerError)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_chroma_error_gives_its_reason(tmp_path, config_dir, empty_500_server):
    refused = free_port()
    env = fh.cli_env(config_dir)
    for port, reason in ((refused, "Connection refused"), (empty_500_server, "Server error '500")):
        args = ["search", "anything", "--data-dir", str(tmp_path / "data"), "--sink", f"chroma://127.0.0.1:{port}"]
        line = _error_line(fh.run_cli(*args, env=env, cwd=tmp_path))
        prefix = f"Error: cannot connect to Chroma at chroma://127.0.0.1:{port}: "
        assert line.startswith(prefix) and reason in line[len(prefix):], line
        _traced(fh.run_cli("-v", *args, env=env, cwd=tmp_path))


@pytest.mark.slow
def test_a_milvus_lite_run_prints_no_traceback(tmp_path, corpus, config_dir):
    pytest.importorskip("pymilvus")
    done = fh.run_cli("index", str(corpus), "--model", "fake", "--workers", "1", "--data-dir", str(tmp_path / "data"),
                      "--sink", f"milvus://{tmp_path / 'vectors.db'}", env=fh.cli_env(config_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("succeeded: 6 documents"), done.stdout
    assert "Traceback" not in done.stderr and "Method not implemented" not in done.stderr, done.stderr
