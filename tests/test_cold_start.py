"""An unchanged re-run needs no cluster and no model; anything that could change the outcome runs for real.

The first run of each test indexes on the session cluster (``--scheduler``); the re-runs name
a scheduler address nothing listens on, so a run that tried to reach a cluster would fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from tests import faults_helpers as fh

CHUNK_ARGS = ["--chunk-size", "48", "--chunk-overlap", "8"]
NOWHERE = "tcp://127.0.0.1:9"  # the discard port: nothing serves Dask there


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    fh.make_corpus(root, documents=5, words=240, seed=3)
    return root


def _index(corpus, data_dir, scheduler, *extra):
    args = ["index", str(corpus), "--collection", "kb", "--model", "fake", "--data-dir", str(data_dir),
            "--scheduler", scheduler, *CHUNK_ARGS, "--json", *extra]
    outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code == 0, (outcome.output, outcome.exception)
    return json.loads(outcome.stdout)


def _needs_cluster(corpus, data_dir, *extra) -> None:
    """The run tries the cluster (so it did not take the shortcut), and fails to reach it."""
    import dask.config

    args = ["index", str(corpus), "--collection", "kb", "--model", "fake", "--data-dir", str(data_dir),
            "--scheduler", NOWHERE, *CHUNK_ARGS, "--json", *extra]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code != 0, outcome.output


def _jobs(data_dir) -> dict[str, dict]:
    outcome = CliRunner().invoke(main, ["jobs", "list", "--data-dir", str(data_dir), "--json"])
    assert outcome.exit_code == 0, outcome.output
    return {j["id"]: j for j in json.loads(outcome.stdout)}


def test_unchanged_rerun_reaches_no_cluster_and_is_recorded(tmp_path, corpus, client, fake_model):
    data_dir = tmp_path / "data"
    first = _index(corpus, data_dir, client.scheduler.address)
    assert first["status"] == "succeeded" and first["embedded"] == first["chunks"] > 0

    again = _index(corpus, data_dir, NOWHERE)
    assert again["status"] == "succeeded"
    assert (again["documents"], again["chunks"]) == (first["documents"], first["chunks"])
    assert (again["embedded"], again["skipped"], again["deleted"]) == (0, first["chunks"], 0)
    # Nothing was chunked: the job dir holds its spec and result only.
    job_dir = data_dir / "jobs" / again["job_id"]
    assert sorted(p.name for p in job_dir.iterdir()) == ["result.json", "spec.json"]
    # A job like any other in the job service.
    jobs = _jobs(data_dir)
    assert jobs[again["job_id"]]["status"] == "succeeded"


def test_changes_that_matter_run_the_job(tmp_path, corpus, client, fake_model):
    data_dir = tmp_path / "data"
    first = _index(corpus, data_dir, client.scheduler.address)

    # Same size, new mtime: read again (chunks made), nothing embedded since no text changed.
    target = corpus / "doc-001.txt"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = _index(corpus, data_dir, client.scheduler.address)
    assert (touched["embedded"], touched["skipped"]) == (0, first["chunks"])
    assert (data_dir / "jobs" / touched["job_id"] / "chunks").is_dir()

    # Other job options: another chunking is another outcome; a cluster is needed.
    _needs_cluster(corpus, data_dir, "--chunk-size", "40")

    # A new file: embedded.
    (corpus / "doc-new.txt").write_text("A lighthouse keeper writes down the weather every night.\n")
    grown = _index(corpus, data_dir, client.scheduler.address)
    assert grown["embedded"] > 0 and grown["documents"] == first["documents"] + 1
    # ...and then it is known again.
    assert _index(corpus, data_dir, NOWHERE)["embedded"] == 0


def test_after_an_append_a_sync_does_the_work(tmp_path, corpus, client, fake_model):
    data_dir = tmp_path / "data"
    _index(corpus, data_dir, client.scheduler.address)
    (corpus / "doc-000.txt").unlink()
    _index(corpus, data_dir, client.scheduler.address, "--mode", "append")
    # The collection still holds doc-000's chunks: only a real sync deletes them.
    _needs_cluster(corpus, data_dir)
    synced = _index(corpus, data_dir, client.scheduler.address)
    assert synced["deleted"] > 0


def test_unreadable_documents_are_retried(tmp_path, corpus, client, fake_model):
    data_dir = tmp_path / "data"
    pending = corpus / ".pending" / "not-yet"  # inside the source (a hidden folder is not listed)
    pending.parent.mkdir()
    (corpus / "doc-later.txt").symlink_to(pending)  # dangling: listed, unreadable
    first = _index(corpus, data_dir, client.scheduler.address)
    assert [s["doc_id"] for s in first["skipped_documents"]] == ["doc-later.txt"]
    # Nothing about the source changed, but the skipped document may be readable now: read again.
    _needs_cluster(corpus, data_dir)
    pending.write_text("Written after the first run, read by the next one.\n")
    second = _index(corpus, data_dir, client.scheduler.address)
    assert second["skipped_documents"] == [] and second["embedded"] > 0


@pytest.mark.slow  # two real processes
def test_unchanged_rerun_process_imports_no_cluster_or_model(tmp_path, corpus):
    env = fh.cli_env(fh.write_dask_config(tmp_path / "dask-config"))
    data_dir = tmp_path / "data"
    first = fh.run_cli("index", str(corpus), "--collection", "kb", "--model", "fake", "--data-dir", str(data_dir),
                       "--workers", "1", *CHUNK_ARGS, "--json", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    script = (
        "import json, sys, embedfleet\n"
        f"r = embedfleet.index({str(corpus)!r}, collection='kb', model='fake', data_dir={str(data_dir)!r}, "
        "chunk_size=48, chunk_overlap=8)\n"
        "print(json.dumps({'embedded': r.embedded, 'chunks': r.chunks,\n"
        "                  'loaded': sorted(m for m in ('distributed', 'torch', 'sentence_transformers') if m in sys.modules)}))\n"
    )
    again = subprocess.run([sys.executable, "-c", script], check=False, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout.strip().splitlines()[-1])
    assert out == {"embedded": 0, "chunks": json.loads(first.stdout)["chunks"], "loaded": []}


class _NoCluster:
    """A client stand-in that fails the job if anything asks the cluster for anything."""

    def __getattr__(self, name):
        raise AssertionError(f"the unchanged job used the cluster ({name})")


def test_a_dispatched_unchanged_job_uses_no_cluster(tmp_path, corpus, client, fake_model):
    from embedfleet.options import IndexOptions
    from embedfleet.schedulers import JobService
    from embedfleet.schedulers.dispatcher import run_once

    data_dir = tmp_path / "data"
    first = _index(corpus, data_dir, client.scheduler.address)
    options = IndexOptions.merge(None, collection="kb", model="fake", chunk_size=48, chunk_overlap=8)
    with JobService(data_dir=str(data_dir)) as service:
        job = service.submit(str(corpus), user="local", options=options)
        ran = run_once(service, client=_NoCluster())
        assert [j.id for j in ran] == [job.id]
        done = service.job(job.id)
    assert done.status == "succeeded", done.error
    assert (done.embedded, done.chunks, done.documents) == (0, first["chunks"], first["documents"])


def test_a_dropped_collection_is_rebuilt_by_the_next_sync(tmp_path, corpus, client, fake_model):
    """`collections drop` forgets the collection's manifest too: the next sync embeds it all again
    (kept, the manifest and its unchanged-source fingerprint would say there is nothing to do)."""
    data_dir = tmp_path / "data"
    first = _index(corpus, data_dir, client.scheduler.address)
    dropped = CliRunner().invoke(main, ["collections", "drop", "kb", "--data-dir", str(data_dir), "--yes"])
    assert dropped.exit_code == 0, dropped.output
    again = _index(corpus, data_dir, client.scheduler.address)
    assert again["status"] == "succeeded" and again["embedded"] == first["chunks"] > 0
    listed = CliRunner().invoke(main, ["collections", "info", "kb", "--data-dir", str(data_dir), "--json"])
    assert json.loads(listed.stdout)["count"] == first["chunks"]
