"""Fixtures for real vector-store servers: a ``chroma run`` process on a free loopback port.

Import the fixtures into a test module (or into conftest.py) by name::

    from tests.sink_servers import chroma_server  # noqa: F401  (pytest fixture)

``milvus_server_uri`` gives ``(milvus://host:port, options)`` from ``MILVUS_URI`` (``http://host:port``,
``https://host:port`` or ``milvus://host:port``) and skips when it is unset: a Milvus server
is external, so its tests carry the ``server`` marker.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

__all__ = ["chroma_server", "milvus_server_uri", "free_port", "start_chroma_server", "wait_for_heartbeat"]

STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chroma_executable() -> str:
    # The venv running the tests has the chroma CLI next to its python.
    candidate = Path(sys.executable).with_name("chroma")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("chroma")
    if not found:
        pytest.fail("the `chroma` command is not installed next to this Python")
    return found


def wait_for_heartbeat(url: str, process: subprocess.Popen, *, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chroma server exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"chroma server did not answer {url} within {timeout:.0f}s")


def start_chroma_server(path: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    # Another process may grab a port between our probe and the server's bind: retry a few times.
    last: Exception | None = None
    for _ in range(3):
        port = free_port()
        log = open(log_path, "ab")
        process = subprocess.Popen(
            [_chroma_executable(), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        try:
            wait_for_heartbeat(f"http://127.0.0.1:{port}/api/v2/heartbeat", process)
            return process, port
        except RuntimeError as exc:
            last = exc
            stop(process)
    raise RuntimeError(f"could not start a chroma server (log: {log_path}): {last}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """``chroma://127.0.0.1:<port>`` of a Chroma server run for this test session."""
    root = tmp_path_factory.mktemp("chroma-server")
    process, port = start_chroma_server(root / "db", root / "server.log")
    try:
        yield f"chroma://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="session")
def milvus_server_uri():
    """``(milvus://host:port, options)`` of the external Milvus server named by MILVUS_URI.

    Skips without it. Credentials, if any, come from MILVUS_TOKEN / MILVUS_USER /
    MILVUS_PASSWORD, which the sink reads itself.
    """
    raw = os.environ.get("MILVUS_URI")
    if not raw:
        pytest.skip("MILVUS_URI is not set (e.g. http://127.0.0.1:19530)")
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    options = {"secure": True} if parts.scheme == "https" else {}
    return f"milvus://{parts.hostname}:{parts.port or 19530}", options
