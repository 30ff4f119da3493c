"""A real ``embedfleet serve`` subprocess on loopback, its tokens, and an HTTP client for tests."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests import faults_helpers as fh

#: Limits the tests run into on purpose.
INLINE_LIMIT = 512 * 1024
REQUEST_LIMIT = 1024 * 1024
EMBED_QUEUE_LIMIT = 64


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    data_dir: Path
    roots: Path
    env: dict[str, str]
    database_url: str | None = None
    tokens: dict[str, str] = field(default_factory=dict)  # name -> secret
    token_ids: dict[str, int] = field(default_factory=dict)

    def client(self, who: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_job(self, who: str, job_id: str, *, until=("succeeded", "failed", "cancelled"), timeout: float = 120) -> dict:
        with self.client(who) as http:
            deadline = time.monotonic() + timeout
            while True:
                body = http.get(f"/v1/jobs/{job_id}").json()
                if body["status"] in until:
                    return body
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {body['status']} after {timeout}s: {body}\n{self.log_text()[-3000:]}")
                time.sleep(0.1)


def config_extra(roots: Path, pq: Path, **more: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "cluster": {"workers": 1, "dashboard-address": "127.0.0.1:0"},
        "jobs": {
            "allowed-roots": [str(roots)],
            "poll-seconds": 0.1,
            "tiers": {"free": {"daily-chunks": 1_000_000, "concurrent-jobs": 4, "multiplier": 1.0}},
        },
        "sinks": {"named": {"default": None, "parquet": f"parquet://{pq}"}},
        "server": {
            "max-inline-bytes": INLINE_LIMIT,
            "max-request-bytes": REQUEST_LIMIT,
            "embeddings": {"queue-limit": EMBED_QUEUE_LIMIT},
            "rate-limits": {"free": 100_000, "premium": 3, "default": 100_000},
        },
    }
    extra.update(more)
    return extra


def start_server(tmp: Path, *, extra: dict[str, Any] | None = None, slow: float | None = None,
                 timeout: float = 180, log_name: str = "serve.log", database_url: str | None = None) -> Server:
    data_dir, roots = tmp / "data", tmp / "roots"
    roots.mkdir(parents=True, exist_ok=True)
    config_dir = fh.write_dask_config(tmp / "dask-config", extra if extra is not None else config_extra(roots, tmp / "pq"))
    env = fh.cli_env(config_dir, slow=slow)
    log = tmp / log_name
    db = ("--db", database_url) if database_url else ()
    process = fh.start_cli("serve", "--port", "0", "--data-dir", str(data_dir), *db, env=env, cwd=tmp, log=log)
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = re.search(r"embedfleet serve on (http://127\.0\.0\.1:\d+)", text)
        if found:
            url = found.group(1)
            break
        if process.poll() is not None or time.monotonic() > deadline:
            fh.kill_group(process)
            raise AssertionError(f"embedfleet serve did not start:\n{text[-4000:]}")
        time.sleep(0.1)
    return Server(url=url, process=process, log=log, data_dir=data_dir, roots=roots, env=env, database_url=database_url)


def add_token(server: Server, name: str, user: str, *, admin: bool = False, expires_in: float | None = None) -> str:
    """A token made on the server's database, as ``embedfleet tokens create`` makes it."""
    import datetime as dt

    from embedfleet.schedulers.service import JobService
    from embedfleet.schedulers.tokens import TokenStore

    with JobService(server.database_url, data_dir=server.data_dir) as service:
        lifetime = dt.timedelta(seconds=expires_in) if expires_in is not None else None
        info, secret = TokenStore(service).create(user, admin=admin, expires_in=lifetime)
    server.tokens[name] = secret
    server.token_ids[name] = info.id
    return secret


def stop_server(server: Server, *, timeout: float = 60) -> int:
    """SIGTERM, as a service manager stops it; the exit status."""
    import signal

    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout)
    finally:
        fh.kill_group(server.process)


def documents(n: int, *, words: int = 30, prefix: str = "doc", seed: int = 0) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    return [{"id": f"{prefix}-{i}", "text": fh.paragraph(rng, words), "metadata": {"n": i}} for i in range(n)]
