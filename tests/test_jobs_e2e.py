"""The job service over the real pipeline (run_job) on the session's LocalCluster, fake embedder."""

from __future__ import annotations

import threading

import dask.config
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

from embedfleet.pipeline.run import run_job
from embedfleet.schedulers.dispatcher import Dispatcher, run_once
from embedfleet.errors import QuotaExceeded
from embedfleet.schedulers.service import JobService
from embedfleet.sinks.naming import physical_name
from tests.db import db_url, wait_for  # noqa: F401


# pipeline/visibility.py's probe task keys.
VISIBILITY_PROBE_PREFIX = "embedfleet-probe-"


class PriorityRecorder(SchedulerPlugin):
    """Records the Dask priority tuple of every task that enters the scheduler."""

    name = "embedfleet-test-priorities"

    def __init__(self):
        self.priorities: dict = {}

    def update_graph(self, scheduler, *, priority=None, **kwargs):
        self.priorities.update(priority or {})

    def user_priorities(self, *, prefix: str = "", probes: bool = False) -> set:
        keys = {k: str(k).lstrip("('") for k in self.priorities}
        return {
            self.priorities[k][0]
            for k, name in keys.items()
            if name.startswith(prefix) and probes == name.startswith(VISIBILITY_PROBE_PREFIX)
        }


@pytest.fixture
def jobs(db_url, data_dir, fake_model):  # noqa: F811
    with dask.config.set({"embedfleet.embed.model": fake_model}):
        service = JobService(db_url, data_dir=data_dir)
        yield service
        service.close()


def test_dispatched_job_runs_on_the_cluster_with_its_priority(jobs, client, docs_dir):
    scheduler = client.cluster.scheduler
    recorder = PriorityRecorder()
    scheduler.add_plugin(recorder)
    try:
        jobs.add_user("pat", tier="premium")
        job = jobs.submit(str(docs_dir), user="pat", collection="kb", priority=30, chunk_size=24, chunk_overlap=4)
        [ran] = run_once(jobs, client=client)
    finally:
        scheduler.remove_plugin(name=recorder.name)
    assert (ran.id, ran.status, ran.stage) == (job.id, "succeeded", "done")
    assert ran.documents == 4 and ran.embedded == ran.chunks > 4 and ran.charged == ran.embedded
    assert jobs.quota("pat").used_today == ran.embedded
    # Dask priority = -(user priority): 30 * premium 2.0 = 60 on the chunking and embedding tasks.
    assert recorder.user_priorities(prefix=f"chunk-{job.id}") == {-60}
    assert recorder.user_priorities(prefix=f"embed-{job.id}") == {-60}
    recorder_all = recorder.user_priorities()
    # The start-of-job visibility probe (milliseconds) runs ahead of every queued task.
    [probe_priority] = recorder.user_priorities(probes=True)
    assert probe_priority < -60

    # The same corpus again: nothing changed, nothing embedded, nothing charged.
    again = jobs.submit(str(docs_dir), user="pat", collection="kb", chunk_size=24, chunk_overlap=4)
    run_once(jobs, client=client)
    info = jobs.status(again.id, user="pat")
    assert (info.status, info.embedded, info.skipped, info.charged) == ("succeeded", 0, ran.chunks, 0)
    assert jobs.quota("pat").used_today == ran.embedded
    assert recorder_all == {-60}, "every task of the job carries its priority"


def test_exact_quota_check_stops_the_real_pipeline_before_embedding(db_url, data_dir, docs_dir, fake_model, client):  # noqa: F811
    with dask.config.set({
        "embedfleet.embed.model": fake_model,
        "embedfleet.jobs.tiers.tiny": {"daily-chunks": 3, "concurrent-jobs": 1, "multiplier": 1.0},
    }):
        service = JobService(db_url, data_dir=data_dir, estimator=lambda source, chunk: 1)  # an estimate that fits
        service.add_user("tim", tier="tiny")
        job = service.submit(str(docs_dir), user="tim", collection="kb", chunk_size=24, chunk_overlap=4)
        run_once(service, client=client)
        info = service.status(job.id, user="tim")
        service.close()
    assert info.status == "failed"
    assert "to embed but user 'tim' has only 3 of today's 3 chunks left" in info.error
    assert (info.embedded, info.charged) == (0, 0) and info.chunks > 3
    # The store was opened (creating the collection) beside chunking; the refused job leaves no
    # empty collection behind.
    assert physical_name("tim", "kb") not in _collections(data_dir)


def _collections(data_dir) -> list[str]:
    from embedfleet.sinks.registry import open_sink

    with open_sink(f"chroma://{data_dir}/chroma") as sink:
        return sink.list_collections()


def test_a_refused_job_keeps_a_collection_that_has_data(db_url, data_dir, docs_dir, fake_model, client):  # noqa: F811
    """Only an empty collection no job committed to is the refused job's own: one with data stays."""
    tiers = {"embedfleet.jobs.tiers.tiny": {"daily-chunks": 1000, "concurrent-jobs": 1, "multiplier": 1.0}}
    with dask.config.set({"embedfleet.embed.model": fake_model, **tiers}):
        service = JobService(db_url, data_dir=data_dir, estimator=lambda source, chunk: 1)
        service.add_user("tim", tier="tiny")
        first = service.submit(str(docs_dir), user="tim", collection="kb", chunk_size=24, chunk_overlap=4)
        run_once(service, client=client)
        stored = service.status(first.id, user="tim").embedded
        (docs_dir / "new.txt").write_text("A new document about harbours, cranes and winter storms. " * 40)
        with dask.config.set({"embedfleet.jobs.tiers.tiny.daily-chunks": stored + 1}):
            second = service.submit(str(docs_dir), user="tim", collection="kb", chunk_size=24, chunk_overlap=4)
            run_once(service, client=client)
        info = service.status(second.id, user="tim")
        service.close()
    assert info.status == "failed" and "to embed but user 'tim' has only 1 of" in info.error
    from embedfleet.sinks.registry import open_sink

    with open_sink(f"chroma://{data_dir}/chroma") as sink:
        assert sink.open(physical_name("tim", "kb")).count() == stored


def test_a_no_change_sync_is_admitted_with_little_quota_left(db_url, data_dir, fake_model, client, tmp_path):  # noqa: F811
    """A no-change sync of a collection larger than what the user has left is admitted (unchanged
    chunks are free) and charges nothing; a changed source is refused by the exact count, before
    anything is embedded, and charged nothing either."""
    from tests import faults_helpers as fh

    corpus = tmp_path / "corpus"
    fh.make_corpus(corpus, documents=200, words=400, seed=3)
    args = dict(collection="kb")  # default chunking (200/32 tokens), where the estimate errs most
    with dask.config.set({"embedfleet.embed.model": fake_model,
                          "embedfleet.jobs.tiers.small": {"daily-chunks": 100000, "concurrent-jobs": 1, "multiplier": 1.0}}):
        service = JobService(db_url, data_dir=data_dir)  # the real estimator, from file sizes
        service.add_user("syn", tier="small")
        first = service.submit(str(corpus), user="syn", **args)
        run_once(service, client=client)
        built = service.status(first.id, user="syn")
        assert built.status == "succeeded" and built.charged == built.chunks > 150
        # 150 left, fewer than the collection holds and than the estimator's error on it.
        with dask.config.set({"embedfleet.jobs.tiers.small.daily-chunks": built.chunks + 150}):
            assert service.quota("syn").remaining == 150
            with pytest.raises(QuotaExceeded, match="has only 150 of"):  # a new collection still is refused
                service.submit(str(corpus), user="syn", **{**args, "collection": "copy"})
            same = service.submit(str(corpus), user="syn", **args)
            # Even less what the collection holds, the estimate's own error is more than is left:
            # only the exact count can tell this job embeds nothing.
            assert same.estimated_chunks > 150
            run_once(service, client=client)
            unchanged = service.status(same.id, user="syn")
            assert (unchanged.status, unchanged.embedded, unchanged.skipped, unchanged.charged) == (
                "succeeded", 0, built.chunks, 0)

            fh.make_corpus(corpus, documents=200, words=400, seed=4)  # every document rewritten
            changed = service.submit(str(corpus), user="syn", **args)
            run_once(service, client=client)
            refused = service.status(changed.id, user="syn")
            assert refused.status == "failed" and "chunks to embed but user 'syn' has only 150 of" in refused.error
            assert (refused.embedded, refused.charged) == (0, 0)
            assert service.quota("syn").used_today == built.chunks
        service.close()


def test_cancel_stops_the_jobs_dask_tasks(jobs, client, docs_dir):
    """Cancel while the job is between chunking and embedding: run_job cancels its futures."""
    job = jobs.submit(str(docs_dir), user="carl", collection="kb", chunk_size=24, chunk_overlap=4)

    def runner(spec, **kwargs):
        before_embed, cancel = kwargs["before_embed"], kwargs["cancel"]

        def gated(n):
            before_embed(n)
            assert cancel.wait(20)  # hold here until the service's cancel reaches the run

        return run_job(spec, **{**kwargs, "before_embed": gated})

    d = Dispatcher(jobs, client=client, runner=runner, tick=0.05, poll_seconds=0.1)
    thread = threading.Thread(target=d.run, kwargs={"once": True}, daemon=True)
    thread.start()
    wait_for(lambda: jobs.status(job.id, user="carl").to_embed, timeout=60)
    jobs.cancel(job.id, user="carl")
    thread.join(60)
    info = jobs.status(job.id, user="carl")
    assert info.status == "cancelled" and info.embedded < info.chunks
    assert info.charged == info.embedded
    assert not any(client.processing().values())  # nothing of the job left running
