"""A real S3 API on loopback for tests: moto's server mode in its own process.

The pipeline reaches it only the way it reaches any S3: through the standard AWS variables
(``AWS_ENDPOINT_URL``, keys, region), which :func:`s3_env` gives and the fixtures set only for
the tests that use it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["SECRET", "MotoServer", "free_port", "moto_server", "s3_env"]

#: The test server's secret key: tests look for it where no credential may be.
SECRET = "moto-secret-never-stored"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, port: int, process: subprocess.Popen):
        self.port, self.process = port, process
        self.endpoint = f"http://127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key=SECRET, region_name="us-east-1")


def s3_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the test server, as a real deployment would set it."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextmanager
def moto_server(log: Path) -> Iterator[MotoServer]:
    """moto's S3 server on a free loopback port, until the block ends."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}; see {log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not listen on port {port}; see {log}") from None
                time.sleep(0.1)
        yield MotoServer(port, process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
