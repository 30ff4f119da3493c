"""What a sync may delete, and the diff that decides it (issue 14, items 1, 2 and 5).

* The diff is plain pyarrow tasks (tasks/diff.py), tested here without a cluster, and through
  the real pipeline on the session cluster with a real Chroma store.
* A dispatcher running many jobs at once on collections that already exist (so every job
  diffs) finishes them all: the dask-expr graphs it used to build in job threads deadlocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import dask.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedfleet.errors import CorruptManifest, DuplicateDocumentError, MassDeleteRefused
from embedfleet.pipeline.manifest import Manifest
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from embedfleet.sinks.naming import physical_name
from embedfleet.tasks import diff
from tests import faults_helpers as fh

CHUNKING = dict(chunk_size=48, chunk_overlap=8)


def _ids(path: Path, rows: list[tuple[str, str, int]]) -> str:
    pq.write_table(pa.table({"doc_id": [r[0] for r in rows], "chunk_id": [r[1] for r in rows],
                             "chunk_index": pa.array([r[2] for r in rows], pa.int32())}), path)
    return str(path)


# --------------------------------------------------------------------------- the pure diff


def test_bucket_diff_keeps_skipped_documents_and_folders(tmp_path):
    old = _ids(tmp_path / "old.parquet", [("a.txt", "a0", 0), ("sub/b.txt", "b0", 0), ("sub/c.txt", "c0", 0),
                                          ("d.txt", "d0", 0), ("e.txt", "e0", 0)])
    new = _ids(tmp_path / "new.parquet", [("a.txt", "a0", 0), ("e.txt", "e1", 0)])
    counts = diff.diff_bucket_stage([old], [(0, new)], mode="sync", protected=("sub/", "d.txt"),
                                    check_duplicates=False, out_dir=str(tmp_path / "out"), bucket=0)
    # e.txt changed (e0 stale, e1 fresh); d.txt and sub/ could not be read: kept, not deleted.
    assert pq.read_table(tmp_path / "out/stale/b0000.parquet").column("chunk_id").to_pylist() == ["e0"]
    assert pq.read_table(tmp_path / "out/fresh/00000-b0000.parquet").column("chunk_id").to_pylist() == ["e1"]
    manifest = pq.read_table(tmp_path / "out/manifest/b0000.parquet")
    assert sorted(manifest.column("chunk_id").to_pylist()) == ["a0", "b0", "c0", "d0", "e1"]
    assert (counts["stale"], counts["kept"], counts["documents_before"], counts["documents_gone"]) == (1, 3, 5, 0)


def test_bucket_diff_counts_gone_documents_and_duplicates(tmp_path):
    old = _ids(tmp_path / "old.parquet", [("a", "a0", 0), ("b", "b0", 0), ("b", "b1", 1), ("c", "c0", 0)])
    new = _ids(tmp_path / "new.parquet", [("a", "a0", 0), ("x", "x0", 0), ("x", "y0", 0)])
    counts = diff.diff_bucket_stage([old], [(0, new)], mode="sync", protected=(), check_duplicates=True,
                                    out_dir=str(tmp_path / "out"), bucket=0)
    assert counts["documents_gone"] == 2 and counts["gone_examples"] == ["b", "c"]
    assert counts["duplicates"] == ["x"]
    appended = diff.diff_bucket_stage([old], [(0, new)], mode="append", protected=(), check_duplicates=False,
                                      out_dir=str(tmp_path / "append"), bucket=0)
    assert appended["stale"] == 0 and not (tmp_path / "append/stale").exists()
    merged = pq.read_table(tmp_path / "append/manifest/b0000.parquet").column("chunk_id").to_pylist()
    assert sorted(merged) == ["a0", "b0", "b1", "c0", "x0", "y0"]


def test_split_then_diff_equals_one_bucket(tmp_path):
    rows = [(f"doc-{i}", f"{i:032x}", 0) for i in range(500)]
    old = _ids(tmp_path / "old.parquet", rows[:400])
    new = _ids(tmp_path / "new.parquet", rows[100:])
    stale, fresh = set(), set()
    old_in: dict[int, list[str]] = {}
    new_in: dict[int, list] = {}
    for b, path in diff.split_stage(old, columns=diff.IDS.names, out_dir=str(tmp_path / "o"), tag="0", buckets=4).items():
        old_in.setdefault(b, []).append(path)
    for b, path in diff.split_stage(new, columns=diff.NEW_COLUMNS, out_dir=str(tmp_path / "n"), tag="0", buckets=4).items():
        new_in.setdefault(b, []).append((0, path))
    assert len(new_in) == 4
    for b in range(4):
        out = tmp_path / "out"
        diff.diff_bucket_stage(old_in.get(b, []), new_in.get(b, []), mode="sync", protected=(),
                               check_duplicates=False, out_dir=str(out), bucket=b)
        if (out / f"stale/b{b:04d}.parquet").exists():
            stale |= set(pq.read_table(out / f"stale/b{b:04d}.parquet").column("chunk_id").to_pylist())
        if (out / f"fresh/00000-b{b:04d}.parquet").exists():
            fresh |= set(pq.read_table(out / f"fresh/00000-b{b:04d}.parquet").column("chunk_id").to_pylist())
    assert stale == {r[1] for r in rows[:100]} and fresh == {r[1] for r in rows[400:]}


# --------------------------------------------------------------------------- through the pipeline


def _spec(source: Path, data: Path, **options):
    return build_job_spec(str(source), collection="kb", model="fake", data_dir=str(data), **CHUNKING, **options)


def _stored(data: Path) -> set[str]:
    return set(fh.read_chroma(f"chroma://{data}/chroma", "local", "kb"))


def _corpus(root: Path, n: int) -> None:
    fh.make_corpus(root, documents=n, words=120, seed=3)


def test_sync_refuses_to_delete_most_of_a_collection(tmp_path, client, fake_model):
    source, data = tmp_path / "src", tmp_path / "data"
    _corpus(source, 6)
    assert run_job(_spec(source, data), client=client).status == "succeeded"
    before = _stored(data)
    for path in sorted(source.iterdir())[:4]:
        path.unlink()
    with pytest.raises(MassDeleteRefused, match=r"would delete 4 of the 6 documents .*--allow-mass-delete"):
        run_job(_spec(source, data), client=client)
    assert _stored(data) == before  # nothing deleted, nothing written
    result = run_job(_spec(source, data, allow_mass_delete=True), client=client)
    assert result.status == "succeeded" and result.deleted > 0
    assert {c for c in before if c in _stored(data)} == _stored(data)
    assert len(_stored(data)) < len(before)


def test_sync_of_a_source_with_no_readable_document_deletes_nothing(tmp_path, client, fake_model):
    source, data = tmp_path / "corpus.jsonl", tmp_path / "data"
    source.write_text("".join(json.dumps({"text": f"document number {i} " * 30}) + "\n" for i in range(4)))
    assert run_job(_spec(source, data), client=client).status == "succeeded"
    before = _stored(data)
    source.write_text("")  # the share came back empty
    with dask.config.set({"embedfleet.index.max-delete-fraction": 1.0}):
        with pytest.raises(MassDeleteRefused, match="no readable document"):
            run_job(_spec(source, data), client=client)
    assert _stored(data) == before


def test_rerun_where_every_document_is_skipped_succeeds_and_deletes_nothing(tmp_path, client, fake_model):
    source, data = tmp_path / "src", tmp_path / "data"
    _corpus(source, 3)
    assert run_job(_spec(source, data), client=client).status == "succeeded"
    before = _stored(data)
    for path in source.iterdir():  # every document now over the size limit: skipped, kept
        path.write_text(path.read_text() * 3)
    with dask.config.set({"embedfleet.read.max-document-bytes": 100}):
        result = run_job(_spec(source, data), client=client)
    assert result.status == "succeeded"
    assert (result.embedded, result.deleted, len(result.skipped_documents)) == (0, 0, 3)
    assert _stored(data) == before
    # The manifest still names the kept chunks: the next good run diffs against them and
    # deletes those the grown documents no longer have.
    again = run_job(_spec(source, data), client=client)
    assert again.status == "succeeded" and again.deleted == len(before - _stored(data)) > 0
    assert run_job(_spec(source, tmp_path / "reference"), client=client).status == "succeeded"
    assert _stored(data) == _stored(tmp_path / "reference")


def test_full_after_the_manifest_was_lost_or_damaged_reconciles_with_the_store(tmp_path, client, fake_model):
    source, data = tmp_path / "src", tmp_path / "data"
    _corpus(source, 4)
    assert run_job(_spec(source, data), client=client).status == "succeeded"
    first = _stored(data)
    manifest = Manifest(str(data), f"chroma://{data}/chroma", physical_name("local", "kb"))
    victim = sorted(source.iterdir())[0]
    victim.write_text("an entirely different document about harbors and windows. " * 20)

    (manifest.root / "CURRENT").write_text("{not json")
    with pytest.raises(CorruptManifest, match=r"manifest of collection .* is corrupt .*CURRENT.*--mode full"):
        run_job(_spec(source, data), client=client)

    result = run_job(_spec(source, data, mode="full"), client=client)
    assert result.status == "succeeded" and result.deleted > 0
    after = _stored(data)
    reference = tmp_path / "reference"
    assert run_job(_spec(source, reference), client=client).status == "succeeded"
    assert after == _stored(reference)  # the collection equals the source: stale chunks gone
    assert first - after and manifest.current is not None

    # A manifest deleted outright: full again finds nothing stale, and sync works afterwards.
    import shutil

    shutil.rmtree(manifest.root)
    assert run_job(_spec(source, data, mode="full"), client=client).deleted == 0
    assert _stored(data) == after
    assert run_job(_spec(source, data), client=client).embedded == 0


def test_duplicate_doc_ids_are_refused_before_anything_is_written(tmp_path, client, fake_model):
    source, data = tmp_path / "rows.jsonl", tmp_path / "data"
    source.write_text("".join(json.dumps({"id": i % 3, "text": f"row {i} " * 20}) + "\n" for i in range(5)))
    with pytest.raises(DuplicateDocumentError):
        run_job(_spec(source, data, id_column="id"), client=client)
    import chromadb

    assert physical_name("local", "kb") not in [c.name for c in chromadb.PersistentClient(str(data / "chroma")).list_collections()] \
        or not _stored(data)


# --------------------------------------------------------------------------- the dispatcher under load


@pytest.mark.slow
def test_dispatcher_runs_many_diffing_jobs_at_once_without_hanging(tmp_path, fake_model):
    """27 jobs of 3 users into 9 collections that exist (every job diffs), one `jobs run`."""
    from embedfleet.schedulers.service import JobService

    data = tmp_path / "data"
    env = fh.cli_env(fh.write_dask_config(tmp_path / "cfg"))
    users, collections = ["ann", "bob", "cy"], ["media", "kb", "notes"]
    sources = {}
    for user in users:
        for collection in collections:
            sources[user, collection] = root = tmp_path / "src" / user / collection
            fh.make_corpus(root, documents=3, words=80, seed=hash((user, collection)) % 1000)

    def submit_all(service: JobService, rounds: int) -> list[str]:
        ids = []
        for r in range(rounds):
            for (user, collection), root in sources.items():
                if r:
                    (root / f"extra-{r}.txt").write_text(f"round {r} of {user} in {collection}. " * 15)
                ids.append(service.submit(str(root), user=user, collection=collection, **CHUNKING).id)
        return ids

    def run_dispatcher(deadline: float) -> None:
        log = tmp_path / "dispatcher.log"
        process = fh.start_cli("jobs", "run", "--once", "--max-running", "20", "--data-dir", str(data),
                               env=env, cwd=tmp_path, log=log)
        try:
            process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            fh.kill_group(process)
            pytest.fail(f"`jobs run --once` still running after {deadline:.0f}s (hung?); log:\n{log.read_text()[-3000:]}")
        assert process.returncode == 0, log.read_text()[-3000:]

    with dask.config.set({"embedfleet.embed.model": fake_model}):
        service = JobService(None, data_dir=data)
        for user in users:
            service.add_user(user, tier="enterprise")
        first = submit_all(service, 1)
        run_dispatcher(240)
        assert {service.status(j, user=u).status for j, u in zip(first, [u for u, _ in sources])} == {"succeeded"}
        second = submit_all(service, 3)
        started = time.monotonic()
        run_dispatcher(300)
        elapsed = time.monotonic() - started
        infos = [service.job(j) for j in second]
        service.close()
    assert len(infos) == 27
    assert [i.status for i in infos] == ["succeeded"] * 27, [(i.id, i.status, i.error) for i in infos]
    assert all(i.embedded < i.chunks for i in infos), "unchanged chunks were embedded again: no diff ran"
    print(f"27 diffing jobs in {elapsed:.1f}s")


@pytest.mark.slow
def test_killed_worker_redoes_no_finished_partition(tmp_path, fake_model, monkeypatch):
    """SIGKILL a worker mid-embedding: no read/chunk/embed task whose output was on disk runs again."""
    from distributed import Client, LocalCluster

    from embedfleet.pipeline.cluster import EMBED_SLOT

    log = tmp_path / "tasks.log"
    monkeypatch.setenv(fh.DELAY_ENV, "0.05")
    monkeypatch.setenv(fh.TASK_LOG_ENV, str(log))
    source, data = tmp_path / "src", tmp_path / "data"
    fh.make_corpus(source, documents=24, words=300, seed=11)
    with dask.config.set({"embedfleet.embed.chunks-per-partition": 8, "embedfleet.read.partition-bytes": 8192}):
        spec = _spec(source, data)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      resources={EMBED_SLOT: 1}, preload=[str(fh.HERE)]) as cluster, \
            Client(cluster, set_as_default=False) as client:
        import threading

        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=run_job(spec, client=client)), daemon=True)
        thread.start()
        job_dir = data / "jobs" / spec.job_id
        # Several partitions in (about a second after chunking ended), not the last.
        fh.wait_for(lambda: len(list((job_dir / "embeddings").glob("*.parquet.json"))) >= 6 or not thread.is_alive(),
                    timeout=180, interval=0.02, what="six finished embedding partitions")

        victim = fh.wait_for(lambda: fh.embedding_worker(client, spec.job_id), timeout=60, interval=0.01,
                             what="a worker running an embedding task")
        pid = client.run(os.getpid, workers=[victim])[victim]
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=240)
        assert not thread.is_alive(), "the job did not finish after its worker was killed"
    assert outcome["result"].status == "succeeded"
    # Finished: done on its worker a moment before the kill. A task that ended in the last
    # instant may not have reached the scheduler before the worker died, and rightly runs again.
    finished: set[str] = set()
    again = []
    for line in log.read_text().splitlines():
        event, when, key = line.split(" ", 2)
        if event == "start" and key in finished:
            again.append(key)
        elif event == "done" and float(when) < killed_at - 0.5:
            finished.add(key)
    assert any(k.startswith(f"chunk-{spec.job_id}") for k in finished)
    assert not again, f"finished tasks ran again after the worker was killed: {again}"
