"""The job service over the real pipeline (run_job) on the session's LocalCluster, fake embedder."""

from __future__ import annotations

import threading

import dask.config
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

from embedfleet.pipeline.run import run_job
from embedfleet.schedulers.dispatcher import Dispatcher
from embedfleet.schedulers.service import JobService
from tests.db import db_url, wait_for  # noqa: F401


class PriorityRecorder(SchedulerPlugin):
    """Records the Dask priority tuple of every task that enters the scheduler."""

    name = "embedfleet-test-priorities"

    def __init__(self):
        self.priorities: dict = {}

    def update_graph(self, scheduler, *, priority=None, **kwargs):
        self.priorities.update(priority or {})

    def user_priorities(self, *, prefix: str = "") -> set:
        return {p[0] for k, p in self.priorities.items() if str(k).lstrip("('").startswith(prefix)}


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
        [ran] = jobs.run_once(client=client)
    finally:
        scheduler.remove_plugin(name=recorder.name)
    assert (ran.id, ran.status, ran.stage) == (job.id, "succeeded", "done")
    assert ran.documents == 4 and ran.embedded == ran.chunks > 4 and ran.charged == ran.embedded
    assert jobs.quota("pat").used_today == ran.embedded
    # Dask priority = -(user priority): 30 * premium 2.0 = 60 on the chunking and embedding tasks.
    assert recorder.user_priorities(prefix=f"chunk-{job.id}") == {-60}
    assert recorder.user_priorities(prefix=f"embed-{job.id}") == {-60}
    recorder_all = recorder.user_priorities()

    # The same corpus again: nothing changed, nothing embedded, nothing charged.
    again = jobs.submit(str(docs_dir), user="pat", collection="kb", chunk_size=24, chunk_overlap=4)
    jobs.run_once(client=client)
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
        service.run_once(client=client)
        info = service.status(job.id, user="tim")
        service.close()
    assert info.status == "failed"
    assert "to embed but user 'tim' has only 3 of today's 3 chunks left" in info.error
    assert (info.embedded, info.charged) == (0, 0) and info.chunks > 3


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
