"""Streaming: a job with nothing to diff against embeds each chunk partition as soon as it exists.

Embedding then overlaps chunking, but nothing reaches the store before the whole source has
passed its checks (duplicate document ids, the before-embed quota hook), and a stopped
streaming job resumes without embedding again what it embedded.
"""

from __future__ import annotations

import json

import dask.config
import pytest

from embedfleet.errors import DuplicateDocumentError
from embedfleet.pipeline.embedding import Embedding
from embedfleet.pipeline.follow import Chunked
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from tests import faults_helpers as fh

CHUNKING = dict(chunk_size=48, chunk_overlap=8)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    fh.make_corpus(root, documents=12, words=300, seed=11)
    return root


@pytest.fixture
def small_partitions():
    # About two files per read partition: several chunk partitions for embedding to overlap.
    with dask.config.set({"embedfleet.read.partition-bytes": 4000}):
        yield


def _spec(source, data_dir, model, **extra):
    return build_job_spec(str(source), collection="kb", model=model, data_dir=str(data_dir), **CHUNKING, **extra)


def _count(data_dir) -> int:
    try:
        return len(fh.read_chroma(f"chroma://{data_dir}/chroma", "local", "kb"))
    except Exception as exc:  # a collection that was never written to may not exist at all
        if "does not exist" in str(exc):
            return 0
        raise


def _spy_on_embedding(monkeypatch) -> list[bool]:
    """For each input handed to embedding: whether chunking tasks were still running then."""
    seen: list[bool] = []
    original = Embedding.add

    def add(self, path):
        seen.append(any(isinstance(event, Chunked) for event in self.futures.values()))
        return original(self, path)

    monkeypatch.setattr(Embedding, "add", add)
    return seen


@pytest.mark.parametrize("stream", [True, False])
def test_embedding_starts_before_chunking_ends_only_when_streaming(
    client, tmp_path, corpus, fake_model, small_partitions, monkeypatch, stream
):
    seen = _spy_on_embedding(monkeypatch)
    data_dir = tmp_path / "data"
    result = run_job(_spec(corpus, data_dir, fake_model), client=client, stream=stream)
    assert result.status == "succeeded" and result.embedded == result.chunks > 0
    assert len(seen) > 2, "the corpus must make several chunk partitions"
    assert any(seen) is stream
    assert _count(data_dir) == result.chunks


def test_a_collection_with_history_is_diffed_not_streamed(client, tmp_path, corpus, fake_model, small_partitions, monkeypatch):
    data_dir = tmp_path / "data"
    assert run_job(_spec(corpus, data_dir, fake_model), client=client, stream=True).status == "succeeded"
    (corpus / "doc-003.txt").write_text("A brand new text about harbours and their cranes.\n" * 20)
    seen = _spy_on_embedding(monkeypatch)
    again = run_job(_spec(corpus, data_dir, fake_model), client=client, stream=True)
    assert again.status == "succeeded" and 0 < again.embedded < again.chunks
    assert not any(seen), "a sync over an existing manifest must diff first"


def test_duplicate_documents_are_refused_before_anything_is_written(client, tmp_path, fake_model, small_partitions):
    source = tmp_path / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": f"Paragraph {i} about ships and harbours. " * 30} for i in range(30)]
    rows.append({"id": "d3", "text": "Another document claiming the id d3. " * 30})
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_dir = tmp_path / "data"
    with pytest.raises(DuplicateDocumentError, match="d3"):
        run_job(_spec(source, data_dir, fake_model, id_column="id"), client=client, stream=True)
    assert _count(data_dir) == 0


def test_a_stopped_streaming_job_writes_nothing_and_resumes_without_re_embedding(
    client, tmp_path, corpus, fake_model, small_partitions
):
    data_dir = tmp_path / "data"
    spec = _spec(corpus, data_dir, fake_model)
    embeddings = data_dir / "jobs" / spec.job_id / "embeddings"
    asked: list[int] = []

    def stop_after_some_embedding(chunks: int) -> None:
        asked.append(chunks)
        fh.wait_for(lambda: list(embeddings.glob("*.parquet.json")), timeout=60, what="a streamed embedding partition")
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C: the job stops here, resumable

    with pytest.raises(KeyboardInterrupt):
        run_job(spec, client=client, stream=True, before_embed=stop_after_some_embedding)
    # The cancel reaches the scheduler asynchronously, so it may still hand a worker the next
    # embed task; and a cancelled task that was already running still finishes (writing its
    # output atomically). Count what is embedded once the scheduler has none of the job's tasks
    # left to run and no worker is still running one.
    # The job's last submissions and its cancel travel on the client's batched stream (and the
    # scheduler's compute-task/free-keys on each worker's), which run_on_scheduler and client.run
    # overtake: the check below could pass before the scheduler even knew of an embed task that
    # then ran anyway. A task sent now to every worker runs only after all of that was handled.
    for worker in client.scheduler_info()["workers"]:
        client.submit(int, pure=False, workers=[worker], allow_other_workers=False).result(timeout=60)

    def stopped_job_settled() -> bool:
        pending = client.run_on_scheduler(lambda dask_scheduler, job=spec.job_id: [
            key for key, task in dask_scheduler.tasks.items()
            if job in str(key) and task.state in ("waiting", "queued", "no-worker", "processing")
        ])
        running = client.run(lambda dask_worker: len(dask_worker.state.all_running_tasks))
        return not pending and not any(running.values())

    fh.wait_for(stopped_job_settled, timeout=60, what="the stopped job's tasks to be released and finished")
    assert _count(data_dir) == 0, "nothing is written before before_embed has passed"
    earlier = fh.partition_rows(sorted(embeddings.glob("*.parquet.json")))
    assert earlier > 0

    resumed = run_job(spec, client=client, stream=True, before_embed=asked.append)
    assert resumed.status == "succeeded"
    assert asked[0] == resumed.chunks, "the first run asks for every chunk"
    assert asked[1] == resumed.chunks - earlier, "the resume asks only for what is left"
    assert resumed.embedded == resumed.chunks - earlier
    assert _count(data_dir) == resumed.chunks
