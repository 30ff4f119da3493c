"""Coalesced jobs survive crashes: a `jobs run` dispatcher SIGKILLed mid-batch, and one killed
between the batch's manifest commit and its jobs' records.

Real processes (``python -m embedfleet.cli jobs run`` in its own process group, with its own
LocalCluster, SIGKILLed as a group) and the slowed fake embedder (tests/faults_helpers.py), so
the kill lands while the batch embeds. Afterwards every job of the batch is resumed by the next
dispatcher: no vector lost or duplicated, and every chunk charged exactly once.
"""

from __future__ import annotations

import sqlite3

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedfleet.pipeline.manifest import Manifest
from embedfleet.sinks.naming import physical_name
from tests import faults_helpers as fh

pytestmark = pytest.mark.slow

JOBS = 8
CHUNK_ARGS = ["--chunk-size", "64", "--chunk-overlap", "8", "--mode", "append"]


def _cli(*args: str, settings: dict | None = None):
    import dask.config

    from embedfleet.cli import main

    with dask.config.set({"embedfleet.models.fake": dict(fh.FAKE_MODEL), **(settings or {})}):
        result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return fh.last_json(result.stdout) if "--json" in args else result.output


def _db(data) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data / 'jobs.db'}", uri=True, timeout=10)


def _submit_items(tmp_path, data, settings):
    ids = []
    for i in range(JOBS):
        folder = tmp_path / "items" / f"item-{i}"
        fh.make_corpus(folder, documents=1, words=400, seed=i, prefix=f"item-{i}")
        ids.append(_cli("jobs", "submit", str(folder), "--user", "alice", "--collection", "media", "--model", "fake",
                        *CHUNK_ARGS, "--data-dir", str(data), "--json", settings=settings)["id"])
    return ids


def _embedded_rows(data, job_id) -> int:
    return fh.partition_rows(sorted((data / "jobs" / job_id / "embeddings").glob("*.parquet.json")))


def _check_collection(data, ids):
    rows = fh.read_chroma(f"chroma://{data}/chroma", "alice", "media")
    chunks = {}
    for job_id in ids:
        for path in sorted((data / "jobs" / job_id / "chunks").glob("part-*.parquet")):
            for chunk_id in pq.read_table(path).column("chunk_id").to_pylist():
                chunks[chunk_id] = job_id
    assert set(rows) == set(chunks)  # every chunk of every job, nothing else
    manifest = Manifest(str(data), f"chroma://{data}/chroma", physical_name("alice", "media"))
    listed = [c for p in manifest.files() for c in pq.read_table(p).column("chunk_id").to_pylist()]
    assert sorted(listed) == sorted(chunks)  # each once
    return len(chunks)


def test_sigkill_dispatcher_mid_batch_then_every_job_resumes(tmp_path, client):
    data = tmp_path / "data"
    settings = {"embedfleet.jobs.lease-seconds": 3, "embedfleet.embed.chunks-per-partition": 4,
                "embedfleet.jobs.tiers.free.daily-chunks": 100000}
    ids = _submit_items(tmp_path, data, settings)
    config_dir = fh.write_dask_config(tmp_path / "dask-config",
                                      {"jobs": {"tiers": {"free": {"daily-chunks": 100000}}}})
    env = fh.cli_env(config_dir, slow=0.05, DASK_EMBEDFLEET__JOBS__LEASE_SECONDS="3")
    process = fh.start_cli("jobs", "run", "--once", "--data-dir", str(data), env=env, cwd=tmp_path,
                           log=tmp_path / "dispatcher.log")
    try:
        # Killed once some jobs of the batch have embedded partitions on disk, before it commits.
        fh.wait_for(lambda: sum(_embedded_rows(data, j) for j in ids) >= 6, timeout=240, interval=0.05,
                    what="the batch to embed", process=process)
        fh.kill_group(process)
    finally:
        fh.stop_group(process)
    with _db(data) as db:
        rows = db.execute(f"SELECT status, batch FROM ef_jobs WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall()
    assert {status for status, _ in rows} == {"running"}  # killed: nobody recorded anything
    assert len({batch for _, batch in rows}) == 1  # they ran as one batch
    embedded_before = {j: _embedded_rows(data, j) for j in ids}
    assert 0 < sum(embedded_before.values())

    ran = _cli("jobs", "run", "--once", "--json", "--data-dir", str(data), "--scheduler", client.scheduler.address,
               settings=settings)
    by_id = {j["id"]: j for j in ran}
    assert set(by_id) == set(ids) and {j["status"] for j in ran} == {"succeeded"}, ran
    total = _check_collection(data, ids)
    for job_id in ids:
        job = by_id[job_id]
        assert job["attempt"] == 2
        # This run embedded what the first one had not; the partitions on disk are the job's chunks, once.
        assert job["embedded"] == job["chunks"] - embedded_before[job_id]
        assert _embedded_rows(data, job_id) == job["chunks"]
    used = _cli("quota", "show", "--user", "alice", "--data-dir", str(data), "--json", settings=settings)
    assert used["used_today"] == total  # every chunk charged exactly once over both runs


def test_a_batch_killed_after_its_commit_is_recorded_without_embedding_again(tmp_path, client):
    data = tmp_path / "data"
    settings = {"embedfleet.jobs.lease-seconds": 3, "embedfleet.jobs.tiers.free.daily-chunks": 100000}
    ids = _submit_items(tmp_path, data, settings)
    first = {j["id"]: j for j in _cli("jobs", "run", "--once", "--json", "--data-dir", str(data), "--scheduler",
                                      client.scheduler.address, settings=settings)}
    assert {j["status"] for j in first.values()} == {"succeeded"}
    [batch] = {j["batch"] for j in first.values()}
    # As if the dispatcher died right after the manifest switch: no job recorded, no marker written.
    (data / "batches" / f"{batch}-00" / "committed.json").unlink()  # its one collection's marker
    for job_id in ids:
        (data / "jobs" / job_id / "committed.json").unlink()
        (data / "jobs" / job_id / "result.json").unlink()
    with _db(data) as db:
        db.execute(f"UPDATE ef_jobs SET status = 'interrupted', stage = 'committing', finished_at = NULL "
                   f"WHERE id IN ({','.join('?' * len(ids))})", ids)
    files_before = {j: sorted(p.name for p in (data / "jobs" / j / "embeddings").iterdir()) for j in ids}

    again = {j["id"]: j for j in _cli("jobs", "run", "--once", "--json", "--data-dir", str(data), "--scheduler",
                                      client.scheduler.address, settings=settings)}
    for job_id in ids:
        assert again[job_id]["status"] == "succeeded"
        # The outcome its batch recorded before the switch, not a run that found everything known.
        assert again[job_id]["embedded"] == first[job_id]["embedded"] > 0
        assert sorted(p.name for p in (data / "jobs" / job_id / "embeddings").iterdir()) == files_before[job_id]
    total = _check_collection(data, ids)
    used = _cli("quota", "show", "--user", "alice", "--data-dir", str(data), "--json", settings=settings)
    assert used["used_today"] == total
