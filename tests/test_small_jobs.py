"""Small jobs' fast path: the visibility probe of a worker set is paid once per data dir.

A real local cluster (the session's) and the fake embedder. The first job on the workers
writes the token and waits for every worker before any task; later jobs on the same workers
and data dir write no token and do not wait for their source probe before their read task,
yet a worker that cannot see their source still stops them with the one line, before anything
is written to the store or committed.
"""

from __future__ import annotations

import chromadb
import pytest

from embedfleet.errors import JobError
from embedfleet.pipeline import visibility
from embedfleet.pipeline.jobdir import JobDir
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from embedfleet.sinks.naming import physical_name


def _one_doc(root, name: str, text: str):
    root.mkdir(parents=True)
    (root / f"{name}.md").write_text(text)
    return root


def _spec(source, data_dir, fake_model, *, job_id=None, collection="media"):
    # Mode append: each job adds one media item to the collection (sync would delete the others).
    kwargs = {"job_id": job_id} if job_id else {}
    return build_job_spec(str(source), user="alice", collection=collection, model=fake_model,
                          data_dir=str(data_dir), chunk_size=24, chunk_overlap=4, mode="append", **kwargs)


def test_the_token_is_checked_once_per_worker_set_and_data_dir(client, tmp_path):
    token = tmp_path / "d" / "jobs" / "j1" / "visible.json"
    token.parent.mkdir(parents=True)
    first = visibility.start_check(client, token_path=token, source=str(tmp_path))
    assert first.gates and token.exists()
    first.verify()

    second_token = tmp_path / "d" / "jobs" / "j2" / "visible.json"
    second = visibility.start_check(client, token_path=second_token, source=str(tmp_path))
    assert not second.gates and not second_token.exists()  # the source is still probed
    second.verify()
    assert not visibility.start_check(client, token_path=second_token, source=None).gates

    # Another data dir on the same workers is checked afresh.
    other = tmp_path / "e" / "jobs" / "j3" / "visible.json"
    other.parent.mkdir(parents=True)
    third = visibility.start_check(client, token_path=other, source=None)
    assert third.gates and other.exists()
    third.verify()


def test_a_failed_data_dir_check_is_not_remembered(client, tmp_path):
    token = tmp_path / "d" / "jobs" / "j" / "visible.json"
    token.parent.mkdir(parents=True)
    original = visibility.probe
    try:
        visibility.probe = lambda path, tok, source: original(path + ".elsewhere", tok, source)
        with pytest.raises(JobError, match="cannot see data dir"):
            visibility.check_workers_see(client, token_path=token, source=None)
    finally:
        visibility.probe = original
    assert visibility.start_check(client, token_path=token, source=None).gates


def test_later_small_jobs_skip_the_token_and_still_succeed(client, data_dir, tmp_path, fake_model):
    first = run_job(_spec(_one_doc(tmp_path / "a", "a", "# A\n\nThe first media item, its text."), data_dir,
                          fake_model), client=client)
    assert first.status == "succeeded" and first.embedded == first.chunks > 0
    assert JobDir(str(data_dir / "jobs" / first.job_id)).visible.exists()

    second = run_job(_spec(_one_doc(tmp_path / "b", "b", "# B\n\nThe second media item, other text."), data_dir,
                           fake_model), client=client)
    assert second.status == "succeeded" and second.embedded == second.chunks > 0
    assert not JobDir(str(data_dir / "jobs" / second.job_id)).visible.exists()
    stored = chromadb.PersistentClient(path=str(data_dir / "chroma")).get_collection(physical_name("alice", "media"))
    assert stored.count() == first.chunks + second.chunks


def test_a_source_a_known_worker_cannot_see_still_stops_the_job_in_one_line(client, data_dir, tmp_path, fake_model):
    first = run_job(_spec(_one_doc(tmp_path / "a", "a", "# A\n\nThe first media item, its text."), data_dir,
                          fake_model), client=client)
    assert first.status == "succeeded"
    hidden = _one_doc(tmp_path / "b", "b", "# B\n\nA media item only the driver sees.")
    spec = _spec(hidden, data_dir, fake_model, job_id="hidden-source")
    [worker] = client.scheduler_info()["workers"]
    original = visibility.probe
    try:
        # The probe looks for a path the worker lacks: what a worker with its own disk at the
        # source's path answers (the read task itself still reads the driver's file here, so
        # only the probe can stop the job).
        visibility.probe = lambda path, tok, source: original(path, tok, source + ".elsewhere" if source else None)
        with pytest.raises(JobError) as caught:
            run_job(spec, client=client)
    finally:
        visibility.probe = original
    assert str(caught.value) == (f"worker {worker} cannot see source {hidden}.elsewhere: use shared storage or an "
                                 "object-store data dir (s3://...)")
    job_dir = JobDir(spec.job_dir)
    assert not job_dir.committed.exists() and not job_dir.result.exists()
    stored = chromadb.PersistentClient(path=str(data_dir / "chroma")).get_collection(physical_name("alice", "media"))
    assert stored.count() == first.chunks  # nothing of the stopped job was written
