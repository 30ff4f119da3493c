"""Every failure is one clear line on stderr, its traceback only with -v (issue 14, item 6).

Each test runs ``python -m embedfleet.cli`` in a real subprocess, so what is checked is what a
user's terminal shows: the CLI's own logging, Dask's loggers in the CLI process and in the
worker processes of the LocalCluster it starts, and the store clients'.
"""

from __future__ import annotations

import http.server
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


def _error_line(outcome: subprocess.CompletedProcess) -> str:
    assert outcome.returncode != 0, outcome.stdout + outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), outcome.stderr
    return lines[0]


def _traced(outcome: subprocess.CompletedProcess) -> None:
    assert outcome.returncode != 0, outcome.stdout + outcome.stderr
    assert "Traceback (most recent call last)" in outcome.stderr, outcome.stderr
    assert "NoneType: None" not in outcome.stderr, outcome.stderr


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
