"""Crash-proof jobs, proven with real processes: SIGKILL the job, SIGKILL a worker, stop the sink.

Every fault here is real: ``python -m embedfleet.cli`` subprocesses (with their own
LocalCluster) killed with SIGKILL as a process group, a Dask worker process killed with
SIGKILL, a ``chroma run`` server on loopback stopped and started again. The fake embedder is
slowed down on the workers (a preload, :mod:`tests.faults_helpers`) so the faults land while
embedding is under way; its vectors are deterministic, so "the same collection as a clean
run" is checked vector by vector.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import dask.config
import pytest

from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from tests import faults_helpers as fh
from tests.sink_servers import _chroma_executable, free_port, stop, wait_for_heartbeat

pytestmark = pytest.mark.slow

CHUNKING = dict(chunk_size=64, chunk_overlap=8)
CHUNK_ARGS = ["--chunk-size", "64", "--chunk-overlap", "8"]
PER_PARTITION = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "corpus"
    fh.make_corpus(root, documents=30, words=400, seed=5)
    return root


@pytest.fixture(scope="module")
def reference(corpus, client, tmp_path_factory):
    """What a clean, uninterrupted run stores: chunk id -> vector, text, metadata.

    Run once, in this process on the session cluster; with the fake embedder it is the
    exact collection any correct run of this corpus must end with.
    """
    data_dir = tmp_path_factory.mktemp("reference")
    with dask.config.set({"embedfleet.models.fake": dict(fh.FAKE_MODEL)}):
        spec = build_job_spec(str(corpus), collection="kb", model="fake", data_dir=str(data_dir), **CHUNKING)
    result = run_job(spec, client=client)
    assert result.status == "succeeded" and result.embedded == result.chunks > 0
    return fh.read_chroma(f"chroma://{data_dir}/chroma", "local", "kb")


@pytest.fixture(scope="module")
def real_reference(corpus, client, tmp_path_factory):
    """The same with the real model (minilm), for the variant that kills a real embedding run."""
    data_dir = tmp_path_factory.mktemp("real-reference")
    spec = build_job_spec(str(corpus), collection="kb", model="minilm", data_dir=str(data_dir), **CHUNKING)
    result = run_job(spec, client=client)
    assert result.status == "succeeded" and result.embedded == result.chunks > 0
    return fh.read_chroma(f"chroma://{data_dir}/chroma", "local", "kb")


@pytest.fixture
def config_dir(tmp_path):
    return fh.write_dask_config(tmp_path / "dask-config")


def _cli(*args: str, settings: dict | None = None):
    """An embedfleet command in this process (click's CliRunner): its --json output, parsed.

    Used for the steps after a fault where a fresh interpreter and cluster would only cost
    time (`jobs status`, `jobs resume`, `jobs run --scheduler <the session cluster>`).
    """
    from click.testing import CliRunner

    from embedfleet.cli import main

    with dask.config.set({"embedfleet.models.fake": dict(fh.FAKE_MODEL), **(settings or {})}):
        outcome = CliRunner().invoke(main, list(args))
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    return fh.last_json(outcome.stdout)


@pytest.mark.parametrize("model", ["fake", "minilm"])
def test_sigkill_during_embedding_then_resume(tmp_path, corpus, config_dir, model, request, client):
    """SIGKILL `embedfleet index` (the CLI and its LocalCluster, as a process group) mid-embedding;
    `jobs resume` + `jobs run --once` finish it, embedding only the unfinished partitions.

    With the fake model every step is its own process; with the real model the steps after
    the kill run in this process on the session cluster (where the reference run already
    loaded the model), to keep the test's time down."""
    reference = request.getfixturevalue("reference" if model == "fake" else "real_reference")
    # The fake embedder is slowed down so the kill lands mid-embedding; the real model is slow
    # enough by itself with small partitions.
    per_partition = PER_PARTITION if model == "fake" else 2
    data = tmp_path / "data"
    env = fh.cli_env(config_dir, slow=0.03 if model == "fake" else None,
                     DASK_EMBEDFLEET__EMBED__CHUNKS_PER_PARTITION=str(per_partition))
    process = fh.start_cli("index", str(corpus), "--collection", "kb", "--model", model, "--data-dir", str(data),
                           "--json", *CHUNK_ARGS, env=env, cwd=tmp_path, log=tmp_path / "index.log")
    try:
        done = fh.wait_for(lambda: [p for d in fh.job_dirs(data) for p in (d / "embeddings").glob("*.parquet.json")],
                           timeout=240, interval=0.01, what="a finished embedding partition", process=process)
        fh.kill_group(process)
    finally:
        fh.stop_group(process)
    assert done
    [job_dir] = fh.job_dirs(data)
    finished, total = fh.embed_partitions(job_dir)
    assert 0 < len(finished) < total, f"{len(finished)} of {total} partitions done: the kill came too late"
    unfinished_rows = len(reference) - fh.partition_rows(finished)
    # Nothing a killed process half-wrote may look finished: every sidecar names a readable file.
    for sidecar in finished:
        import pyarrow.parquet as pq

        assert pq.ParquetFile(str(sidecar)[: -len(".json")]).metadata.num_rows == json.loads(sidecar.read_text())["rows"]

    common = ["--data-dir", str(data), "--json"]
    status = _cli("jobs", "status", job_dir.name, "--user", "local", *common)
    assert status["status"] == "running"  # nobody was left to record the crash
    if model == "fake":
        def command(*args: str):
            done = fh.run_cli(*args, env=fh.cli_env(config_dir), cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            return fh.last_json(done.stdout)
    else:
        def command(*args: str):
            return _cli(*args, *(["--scheduler", client.scheduler.address] if args[:2] == ("jobs", "run") else []))

    resumed = command("jobs", "resume", job_dir.name, "--user", "local", *common)
    assert resumed["status"] == "queued"
    [job] = command("jobs", "run", "--once", *common)
    assert job["id"] == job_dir.name and job["status"] == "succeeded", job
    # Only the partitions the killed run had not finished were embedded again.
    assert job["embedded"] == unfinished_rows < len(reference)
    assert job["chunks"] == len(reference)

    stored = fh.read_chroma(f"chroma://{data}/chroma", "local", "kb")
    fh.assert_same_collection(stored, reference)
    fh.assert_nearest_is_itself(f"chroma://{data}/chroma", "local", "kb", stored)


def test_sigkill_index_then_index_again(tmp_path, corpus, config_dir, reference, client):
    """After a SIGKILLed `embedfleet index`, running the same command again just works: the dead
    run does not hold the collection (it is recorded failed, replaced), and the new run completes it."""
    from click.testing import CliRunner

    from embedfleet.cli import main

    data = tmp_path / "data"
    args = ["index", str(corpus), "--collection", "kb", "--model", "fake", "--data-dir", str(data), "--json", *CHUNK_ARGS]
    env = fh.cli_env(config_dir, slow=0.03, DASK_EMBEDFLEET__EMBED__CHUNKS_PER_PARTITION=str(PER_PARTITION))
    process = fh.start_cli(*args, env=env, cwd=tmp_path, log=tmp_path / "index.log")
    try:
        fh.wait_for(lambda: [p for d in fh.job_dirs(data) for p in (d / "embeddings").glob("*.parquet.json")],
                    timeout=240, interval=0.02, what="a finished embedding partition", process=process)
        fh.kill_group(process)
    finally:
        fh.stop_group(process)
    [killed] = fh.job_dirs(data)

    # The same command again (in this process, on the session cluster to save a cluster start).
    with dask.config.set({"embedfleet.models.fake": dict(fh.FAKE_MODEL)}):
        again = CliRunner().invoke(main, [*args, "--scheduler", client.scheduler.address])
    assert again.exit_code == 0, (again.output, again.exception)
    result = json.loads(again.stdout)
    assert result["status"] == "succeeded" and result["chunks"] == len(reference)
    fh.assert_same_collection(fh.read_chroma(f"chroma://{data}/chroma", "local", "kb"), reference)

    status = _cli("jobs", "status", killed.name, "--user", "local", "--data-dir", str(data), "--json")
    # Replaced by the new run: failed (a dispatcher must not resume it over the new manifest).
    assert status["status"] == "failed" and "is gone before the job finished" in status["error"], status


@pytest.mark.parametrize("mode", ["sync", "append"])
def test_resume_after_a_crash_between_manifest_switch_and_commit_marker(tmp_path, corpus, client, fake_model, mode):
    """The one instant a SIGKILL cannot be aimed at from outside: after the manifest's CURRENT
    pointer was switched to the job's new version, before the job's ``committed.json``. Its
    on-disk state is reproduced exactly (a finished job without the marker) and the job resumed:
    it must finish, and the manifest must still describe the collection."""
    import shutil

    from embedfleet.pipeline.manifest import Manifest
    from embedfleet.sinks.naming import physical_name

    docs = tmp_path / "corpus"
    shutil.copytree(corpus, docs)
    data = tmp_path / "data"

    def spec(mode: str = "sync"):
        return build_job_spec(str(docs), collection="kb", model=fake_model, data_dir=str(data), mode=mode, **CHUNKING)

    assert run_job(spec(), client=client).status == "succeeded"
    removed = fh.read_chroma(f"chroma://{data}/chroma", "local", "kb")
    removed = {c for c, row in removed.items() if row["metadata"]["doc_id"] == "doc-003.txt"}
    (docs / "doc-003.txt").unlink()
    (docs / "doc-100.txt").write_text("A document added between the two runs, about a silver harbor in winter.\n")

    second = spec(mode)
    assert run_job(second, client=client).status == "succeeded"
    (data / "jobs" / second.job_id / "committed.json").unlink()
    resumed = run_job(second, client=client)
    assert resumed.status == "succeeded" and resumed.embedded == 0

    manifest = Manifest(str(data), second.sink.uri, physical_name("local", "kb"))
    assert manifest.current is not None and manifest.files()
    assert [p.name for p in manifest.root.iterdir() if p.is_dir()] == [manifest.current.name]
    # The manifest still knows every chunk the store holds: an unchanged re-run embeds nothing
    # and (after append) deletes exactly the removed document's chunks.
    third = run_job(spec(), client=client)
    assert third.embedded == 0
    assert third.deleted == (len(removed) if mode == "append" else 0)
    stored = fh.read_chroma(f"chroma://{data}/chroma", "local", "kb")
    assert not removed & set(stored) and len(stored) == third.chunks


def test_resume_refused_after_another_job_committed_to_the_collection(tmp_path, corpus, client, fake_model):
    """A job stopped after computing its diff, then another job committed to the collection: the
    first job's partitions are slices of a diff against a manifest that is gone, so resuming it
    is refused (clearly) and leaves the collection as the other job made it."""
    import shutil

    from embedfleet.errors import JobError

    docs = tmp_path / "corpus"
    shutil.copytree(corpus, docs)
    data = tmp_path / "data"

    def spec():
        return build_job_spec(str(docs), collection="kb", model=fake_model, data_dir=str(data), **CHUNKING)

    assert run_job(spec(), client=client).status == "succeeded"
    edited = docs / "doc-007.txt"
    edited.write_text(edited.read_text() + "One more sentence about the winter market.\n")

    def killed(_chunks: int) -> None:
        raise KeyboardInterrupt  # the process stops right after the diff, before any embedding

    first = spec()
    with pytest.raises(KeyboardInterrupt):
        run_job(first, client=client, before_embed=killed)
    assert run_job(spec(), client=client).status == "succeeded"
    collection = fh.read_chroma(f"chroma://{data}/chroma", "local", "kb")

    with pytest.raises(JobError, match="collection changed since job .* started"):
        run_job(first, client=client)
    fh.assert_same_collection(fh.read_chroma(f"chroma://{data}/chroma", "local", "kb"), collection)


def _charged(data: Path, job_id: str) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{data / 'jobs.db'}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT charged FROM ef_jobs WHERE id = ?", (job_id,)).fetchone()
    return int(row[0]) if row else 0


def test_sigkill_dispatcher_then_the_next_one_resumes_within_quota(tmp_path, corpus, reference, client):
    """A `jobs run` dispatcher SIGKILLed mid-embedding: the next dispatcher finds the job's lease
    expired, marks it interrupted and resumes it by itself (no `jobs resume`) — for a user whose
    daily quota covers the job once, but not the job again on top of what the first run was
    charged: the resume must only ask for the chunks still to embed."""
    quota = 320  # the job has fewer chunks than that (estimated 306 at submit)
    config_dir = fh.write_dask_config(tmp_path / "dask-config", {"jobs": {"tiers": {"free": {"daily-chunks": quota}}}})
    data = tmp_path / "data"
    # A short lease, so the next dispatcher does not wait a minute to call the job dead.
    lease = {"DASK_EMBEDFLEET__JOBS__LEASE_SECONDS": "3"}
    # Partitions are part of the job's spec: they are set where the job is submitted.
    # The same settings for the steps in this process; partitions are part of the job's spec:
    # they are set where the job is submitted.
    settings = {"embedfleet.jobs.tiers.free.daily-chunks": quota, "embedfleet.jobs.lease-seconds": 3,
                "embedfleet.embed.chunks-per-partition": PER_PARTITION}
    job_id = _cli("jobs", "submit", str(corpus), "--user", "alice", "--collection", "kb", "--model", "fake",
                  *CHUNK_ARGS, "--data-dir", str(data), "--json", settings=settings)["id"]

    env = fh.cli_env(config_dir, slow=0.03, **lease)
    process = fh.start_cli("jobs", "run", "--once", "--data-dir", str(data), env=env, cwd=tmp_path,
                           log=tmp_path / "dispatcher.log")
    try:
        # Killed once the first run was charged more than the quota leaves for a whole second run.
        fh.wait_for(lambda: _charged(data, job_id) > quota - len(reference), timeout=240, interval=0.05,
                    what="the first run to be charged", process=process)
        fh.kill_group(process)
    finally:
        fh.stop_group(process)
    finished, total = fh.embed_partitions(data / "jobs" / job_id)
    assert 0 < len(finished) < total
    charged_before = _charged(data, job_id)
    assert 0 < charged_before < len(reference)

    # The next dispatcher (in this process, on the session cluster) waits out the lease, then resumes.
    [job] = _cli("jobs", "run", "--once", "--json", "--data-dir", str(data), "--scheduler", client.scheduler.address,
                 settings=settings)
    assert job["id"] == job_id and job["status"] == "succeeded" and job["attempt"] == 2, job
    assert job["embedded"] == len(reference) - fh.partition_rows(finished)
    fh.assert_same_collection(fh.read_chroma(f"chroma://{data}/chroma", "alice", "kb"), reference)
    used = _cli("quota", "show", "--user", "alice", "--data-dir", str(data), "--json", settings=settings)
    # Every chunk charged exactly once over both runs (a partition that finished between the
    # last charge and the SIGKILL is charged when the job resumes).
    assert used["used_today"] == len(reference)


def test_sigkill_one_worker_during_embedding(tmp_path, corpus, reference, monkeypatch):
    from distributed import Client, LocalCluster

    from embedfleet.pipeline.cluster import EMBED_SLOT

    # Spawned worker processes inherit the environment: the slow embedder reads its delay there.
    monkeypatch.setenv(fh.DELAY_ENV, "0.03")
    data = tmp_path / "data"
    with dask.config.set({"embedfleet.models.fake": dict(fh.FAKE_MODEL), "embedfleet.embed.chunks-per-partition": PER_PARTITION}):
        spec = build_job_spec(str(corpus), collection="kb", model="fake", data_dir=str(data), **CHUNKING)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      resources={EMBED_SLOT: 1}, preload=[str(fh.HERE)]) as cluster, \
            Client(cluster, set_as_default=False) as client:
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = run_job(spec, client=client)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        job_dir = data / "jobs" / spec.job_id
        fh.wait_for(lambda: list((job_dir / "embeddings").glob("*.parquet.json")) or "error" in outcome,
                    timeout=180, interval=0.02, what="a finished embedding partition")

        victim = fh.wait_for(lambda: fh.embedding_worker(client, spec.job_id), timeout=60, interval=0.01,
                             what="a worker running an embedding task")
        pid = client.run(os.getpid, workers=[victim])[victim]
        finished_before, total = fh.embed_partitions(job_dir)
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=240)
        assert not thread.is_alive(), "the job did not finish after its worker was killed"
        assert victim not in client.run(os.getpid), "the killed worker is still registered"

    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert 0 < len(finished_before) < total, "the worker was killed after embedding had finished"
    assert result.status == "succeeded"
    # Every chunk counted once although the killed worker's partition ran twice.
    assert result.embedded == result.chunks == len(reference)
    fh.assert_same_collection(fh.read_chroma(f"chroma://{data}/chroma", "local", "kb"), reference)


def _start_chroma(path: Path, port: int, log: Path):
    import subprocess

    with open(log, "ab") as out:
        process = subprocess.Popen(
            [_chroma_executable(), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_heartbeat(f"http://127.0.0.1:{port}/api/v2/heartbeat", process)
    except BaseException:
        stop(process)
        raise
    return process


def test_sink_outage_during_writes_fails_then_resume_writes_without_embedding(tmp_path, corpus, config_dir, reference,
                                                                              client):
    port = free_port()
    sink = f"chroma://127.0.0.1:{port}"
    server = _start_chroma(tmp_path / "chroma-db", port, tmp_path / "chroma.log")
    data = tmp_path / "data"
    env = fh.cli_env(
        config_dir, slow=0.03,
        DASK_EMBEDFLEET__EMBED__CHUNKS_PER_PARTITION=str(PER_PARTITION),
        DASK_EMBEDFLEET__WRITE__RETRIES="3",
        DASK_EMBEDFLEET__WRITE__RETRY_DELAY="50ms",
        DASK_EMBEDFLEET__WRITE__RETRY_MAX_DELAY="200ms",
    )
    process = fh.start_cli("index", str(corpus), "--sink", sink, "--collection", "kb", "--model", "fake",
                           "--data-dir", str(data), "--json", *CHUNK_ARGS, env=env, cwd=tmp_path,
                           log=tmp_path / "index.log")
    try:
        fh.wait_for(lambda: [p for d in fh.job_dirs(data) for p in (d / "written").glob("*.json")],
                    timeout=240, interval=0.02, what="the first partition written to the server", process=process)
        stop(server)
        process.wait(timeout=240)
    finally:
        fh.stop_group(process)
        stop(server)
    output = (tmp_path / "index.log").read_text()
    assert process.returncode != 0, output
    error_lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, output
    [error] = error_lines
    # Names the sink, says it gave up after the configured retries, and gives the cause.
    assert sink in error and "after 3 attempts" in error, error
    assert any(cause in error.lower() for cause in ("connect", "refused", "unreachable")), error
    assert output.strip().splitlines() == [error], "the outage is one line: no retry warnings, no second error"

    [job_dir] = fh.job_dirs(data)
    finished, total = fh.embed_partitions(job_dir)
    assert len(finished) == total, "embeddings are all on disk before the job gives up on the sink"
    written = list((job_dir / "written").glob("*.json"))
    assert 0 < len(written) < total

    common = ["--data-dir", str(data), "--json"]
    status = _cli("jobs", "status", job_dir.name, "--user", "local", *common)
    assert status["status"] == "failed" and sink in status["error"]

    server = _start_chroma(tmp_path / "chroma-db", port, tmp_path / "chroma.log")
    try:
        # Resumed and run in this process, on the session cluster: the point is the sink.
        assert _cli("jobs", "resume", job_dir.name, "--user", "local", *common)["status"] == "queued"
        [job] = _cli("jobs", "run", "--once", "--scheduler", client.scheduler.address, *common)
        assert job["status"] == "succeeded", job
        assert job["embedded"] == 0  # the vectors were on disk: the outage cost no embedding
        fh.assert_same_collection(fh.read_chroma(sink, "local", "kb"), reference)
    finally:
        stop(server)
