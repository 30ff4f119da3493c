"""The dispatcher with a fake runner: priority order, tier concurrency, quota at before_embed,
charging, progress, cancellation, leases and clean stops (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import dask.config
import pytest

from embedfleet.errors import QuotaExceeded, SinkError
from embedfleet.schedulers.dispatcher import Dispatcher, JobExecution, run_inline, run_once
from tests.db import FakeRunner, clock, db_url, estimator, make_service, service, wait_for  # noqa: F401


def dispatcher(service, runner, **kwargs):  # noqa: F811
    kwargs = {"client": "the-client", "runner": runner, "tick": 0.02, "poll_seconds": 0.05, **kwargs}
    return Dispatcher(service, **kwargs)


def start(d, *, once=True):
    out: dict = {}

    def target():
        try:
            out["ran"] = d.run(once=once)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_priority_order_with_age_bonus_and_usage_penalty(service, clock):  # noqa: F811
    service.add_user("carol", tier="premium")
    bob = service.submit("/srv", user="bob", collection="kb", priority=45)
    clock.advance(minutes=5)  # bob has waited 5 minutes: +10
    a1 = service.submit("/srv", user="alice", collection="kb", priority=51)
    a2 = service.submit("/srv", user="alice", collection="kb", priority=50)
    c1 = service.submit("/srv", user="carol", collection="kb", priority=30)  # premium: 60
    d1 = service.submit("/srv", user="dave", collection="kb", priority=49)
    ranked = [(c.id, c.effective) for c in service.ledger.rank()]
    assert ranked == [(c1.id, 60), (bob.id, 55), (a1.id, 51), (a2.id, 50), (d1.id, 49)]
    assert service.status(bob.id, user="bob").effective_priority == 55

    runner = FakeRunner()
    ran = dispatcher(service, runner, max_running=1).run(once=True)
    # After a1 runs, alice has one job in the last hour: a2 drops to 48, below dave's 49.
    assert runner.order == [c1.id, bob.id, a1.id, d1.id, a2.id]
    assert [c["priority"] for c in runner.calls] == [60, 55, 51, 49, 48]  # the Dask task priority
    assert {i.status for i in ran} == {"succeeded"}
    assert service.status(a2.id, user="alice").effective_priority == 48  # as dispatched

    # The penalty fades once the hour has passed; the age bonus is capped at 20.
    clock.advance(minutes=61)
    late = service.submit("/srv", user="alice", collection="kb", priority=50)
    clock.advance(minutes=30)
    assert service.status(late.id, user="alice").effective_priority == 70


def test_jobs_on_one_collection_never_run_at_once(service):  # noqa: F811
    service.add_user("ann", tier="premium")
    same = [service.submit("/srv", user="ann", collection="kb").id for _ in range(3)]
    other = service.submit("/srv", user="ann", collection="notes").id
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    thread, out = start(dispatcher(service, runner, max_running=4))
    wait_for(lambda: runner.total_active == 2)
    # One job of "kb" and the "notes" job run; the other "kb" jobs wait, though the tier allows 5.
    assert {service.status(j, user="ann").status for j in same} == {"running", "queued"}
    assert sum(service.status(j, user="ann").status == "running" for j in same) == 1
    assert service.status(other, user="ann").status == "running"
    gate.set()
    thread.join(timeout=30)
    assert "error" not in out
    assert {service.status(j, user="ann").status for j in [*same, other]} == {"succeeded"}
    assert runner.max_active_by_collection("kb") == 1


def test_premium_outranks_free_at_equal_base_priority(service, clock):  # noqa: F811
    service.add_user("pat", tier="premium")
    free = service.submit("/srv", user="fred", collection="kb", priority=50)
    clock.advance(minutes=3)
    premium = service.submit("/srv", user="pat", collection="kb", priority=50)
    assert [(c.id, c.effective) for c in service.ledger.rank()] == [(premium.id, 100), (free.id, 56)]
    runner = FakeRunner()
    dispatcher(service, runner, max_running=1).run(once=True)
    assert runner.order == [premium.id, free.id]


def test_concurrency_per_tier_and_in_total(service):  # noqa: F811
    service.add_user("bob", tier="premium")
    # Distinct collections: jobs on one collection run one at a time (see the test below).
    alice = [service.submit("/srv", user="alice", collection=f"kb{i}").id for i in range(4)]
    bob = [service.submit("/srv", user="bob", collection=f"kb{i}").id for i in range(7)]
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    thread, out = start(dispatcher(service, runner, max_running=8))
    wait_for(lambda: runner.total_active == 7)
    assert service.quota("alice").running == 2  # free: 2 at once
    assert service.quota("bob").running == 5  # premium: 5 at once
    assert len(service.list(user="alice", status="queued")) == 2
    assert len(service.list(user="bob", status="queued")) == 2
    gate.set()
    thread.join(20)
    assert "error" not in out
    assert runner.max_active == {"alice": 2, "bob": 5}
    assert sorted(runner.order) == sorted(alice + bob)

    # --max-running caps the total whatever the tiers allow.
    with dask.config.set({"embedfleet.jobs.queue-limit": 100}):
        service.add_user("erin", tier="enterprise")
        for i in range(9):
            service.submit("/srv", user="erin", collection=f"kb{i}")
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    thread, out = start(dispatcher(service, runner, max_running=3))
    wait_for(lambda: runner.total_active == 3)
    threading.Event().wait(0.2)  # room for a (wrong) fourth start
    assert service.quota("erin").running == 3
    gate.set()
    thread.join(20)
    assert runner.max_total_active == 3 and len(runner.calls) == 9


def test_exact_check_before_embedding_stops_the_job(service, estimator):  # noqa: F811
    estimator.value = 10  # the estimate at submit fits...
    job = service.submit("/srv", user="alice", collection="kb")
    runner = FakeRunner(chunks=1500)  # ...but chunking finds 1500 chunks to embed
    dispatcher(service, runner).run(once=True)
    info = service.status(job.id, user="alice")
    assert info.status == "failed"
    assert "quota exceeded" in info.error and "has 1500 chunks to embed" in info.error
    assert "only 1000 of today's 1000" in info.error
    assert runner.tasks_done[job.id] == 0  # nothing embedded
    assert (info.embedded, info.charged) == (0, 0)
    assert service.quota("alice").used_today == 0


def test_only_embedded_chunks_are_charged(service):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    dispatcher(service, FakeRunner(chunks=100, skipped=70, tasks=3)).run(once=True)
    info = service.status(job.id, user="alice")
    assert (info.status, info.chunks, info.skipped, info.embedded, info.charged, info.to_embed) == (
        "succeeded", 100, 70, 30, 30, 30
    )
    q = service.quota("alice")
    assert (q.used_today, q.reserved, q.remaining) == (30, 0, 970)


def test_running_jobs_reserve_what_they_were_admitted_for(service):  # noqa: F811
    first = service.submit("/srv", user="alice", collection="kb")
    gate = threading.Event()
    runner = FakeRunner(chunks=600, gate=gate)
    thread, out = start(dispatcher(service, runner, max_running=1))
    wait_for(lambda: service.status(first.id, user="alice").to_embed == 600)
    q = service.quota("alice")
    assert (q.used_today, q.reserved, q.remaining) == (0, 600, 400)
    second = service.submit("/srv", user="alice", collection="kb2")
    # Run the second job next to the first: its exact count no longer fits.
    other = dispatcher(service, runner, max_running=1)
    claim = service.ledger.claim(next(c for c in service.ledger.rank() if c.id == second.id), dispatcher=other.name)
    JobExecution(service, claim, client=None, runner=FakeRunner(chunks=600), tick=0.02).run()
    info = service.status(second.id, user="alice")
    assert info.status == "failed" and "has only 400 of today's 1000" in info.error
    gate.set()
    thread.join(20)
    assert service.status(first.id, user="alice").status == "succeeded"
    assert service.quota("alice").used_today == 600


def test_progress_is_visible_while_running(service):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    gate = threading.Event()
    thread, _ = start(dispatcher(service, FakeRunner(chunks=40, documents=3, gate=gate)))
    info = wait_for(lambda: (i := service.status(job.id, user="alice")).chunks == 40 and i)
    assert (info.status, info.stage, info.documents, info.started_at is not None) == ("running", "chunking", 3, True)
    assert info.heartbeat_at is not None and info.dispatcher.startswith("dispatcher:")
    gate.set()
    thread.join(20)
    info = service.status(job.id, user="alice")
    assert (info.status, info.stage, info.embedded, info.finished_at is not None) == ("succeeded", "done", 40, True)


def test_cancelling_a_running_job_stops_its_tasks(service):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    runner = FakeRunner(chunks=1000, tasks=200, task_seconds=0.005)
    thread, _ = start(dispatcher(service, runner))
    wait_for(lambda: service.status(job.id, user="alice").embedded > 0)
    assert service.cancel(job.id, user="alice").cancel_requested
    thread.join(20)
    info = service.status(job.id, user="alice")
    assert info.status == "cancelled" and info.finished_at is not None
    assert 0 < runner.tasks_done[job.id] < 200  # the rest never ran
    # what was embedded before the cancel is charged, nothing more
    assert info.charged == info.embedded == service.quota("alice").used_today < 1000


def test_runner_errors_fail_the_job(service):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    dispatcher(service, FakeRunner(error=SinkError("chroma at localhost:8000 is down"))).run(once=True)
    info = service.status(job.id, user="alice")
    assert (info.status, info.error) == ("failed", "chroma at localhost:8000 is down")
    job = service.submit("/srv", user="alice", collection="kb")
    dispatcher(service, FakeRunner(error=RuntimeError("boom"))).run(once=True)
    assert service.status(job.id, user="alice").error == "RuntimeError: boom"


def test_lease_expiry_marks_the_job_interrupted_and_it_is_resumed(service, clock):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    dead = service.ledger.claim(service.ledger.rank()[0], dispatcher="dispatcher:gone:1:abc")  # then the process died
    clock.advance(30)
    assert service.ledger.expire_leases(60) == []  # still within the lease
    clock.advance(31)
    assert service.ledger.expire_leases(60) == [job.id]
    info = service.status(job.id, user="alice")
    assert info.status == "interrupted" and "stopped renewing its lease" in info.error
    assert service.quota("alice").queued == 1  # it waits to be resumed, not restarted
    # the dead dispatcher, should it wake up, can no longer write to the job
    assert service.ledger.heartbeat(dead) is None
    assert service.ledger.finish(dead, status="succeeded") is False

    runner = FakeRunner()
    dispatcher(service, runner, lease_seconds=60).run(once=True)
    info = service.status(job.id, user="alice")
    assert (info.id, info.status, info.attempt, info.error) == (job.id, "succeeded", 2, None)
    assert runner.order == [job.id]  # same id: the pipeline resumes its finished partitions


def test_an_expired_job_whose_cancel_was_requested_ends_cancelled(service, clock):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    service.ledger.claim(service.ledger.rank()[0], dispatcher="dispatcher:gone:1:abc")
    service.cancel(job.id, user="alice")
    clock.advance(120)
    assert service.ledger.expire_leases(60) == [job.id]
    info = service.status(job.id, user="alice")
    assert info.status == "cancelled" and info.finished_at is not None
    assert service.ledger.has_active() is False


def test_a_dispatcher_that_lost_its_lease_stops_the_run(service, clock):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    claim = service.ledger.claim(service.ledger.rank()[0], dispatcher="slow")
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    execution = JobExecution(service, claim, client=None, runner=runner, tick=0.02, heartbeat_seconds=3600)
    thread = threading.Thread(target=execution.run, daemon=True)
    thread.start()
    try:
        # progress flushed; from now on the run only polls (its next heartbeat is an hour away)
        wait_for(lambda: service.status(job.id, user="alice").chunks == 10)
        clock.advance(120)
        assert service.ledger.expire_leases(60) == [job.id]
        thread.join(10)
    finally:
        gate.set()
    assert execution.lost and execution.cancel_event.is_set()
    assert service.status(job.id, user="alice").status == "interrupted"  # not overwritten


def test_stop_interrupts_running_jobs_and_the_next_dispatcher_resumes_them(service):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    runner = FakeRunner(gate=threading.Event())
    d = dispatcher(service, runner)
    thread, out = start(d, once=False)
    wait_for(lambda: runner.started.is_set())
    d.stop()
    thread.join(20)
    assert [i.status for i in out["ran"]] == ["interrupted"]
    info = service.status(job.id, user="alice")
    assert info.status == "interrupted" and info.finished_at is None
    dispatcher(service, FakeRunner()).run(once=True)
    assert service.status(job.id, user="alice").status == "succeeded"


def test_ctrl_c_stops_cleanly(service, monkeypatch):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    runner = FakeRunner(gate=threading.Event())
    d = dispatcher(service, runner)
    real_idle = d._idle

    def idle(*args):
        if runner.started.is_set():
            raise KeyboardInterrupt
        real_idle(*args)

    monkeypatch.setattr(d, "_idle", idle)
    with pytest.raises(KeyboardInterrupt):
        d.run(once=False)
    assert service.status(job.id, user="alice").status == "interrupted"
    assert service.quota("alice").running == 0


def test_run_inline_records_the_job(service, clock):  # noqa: F811
    seen = []
    result = run_inline(service, "/srv/docs", client="c", collection="kb", runner=FakeRunner(chunks=7),
                                on_progress=seen.append)
    assert result.status == "succeeded" and result.embedded == 7
    assert seen and seen[-1].embedded == 7
    [info] = service.list(user="local")
    assert (info.id, info.status, info.embedded, info.charged, info.dispatcher.startswith("inline:")) == (
        result.job_id, "succeeded", 7, 7, True
    )
    assert service.get_user("local").tier == "unlimited"  # embedfleet.jobs.local-tier

    clock.advance(1)
    with pytest.raises(SinkError, match="down"):
        run_inline(service, "/srv/docs", client="c", runner=FakeRunner(error=SinkError("down")))
    assert service.list(user="local")[0].status == "failed"

    clock.advance(1)
    cancel = threading.Event()
    cancel.set()
    result = run_inline(service, "/srv/docs", client="c", runner=FakeRunner(), cancel=cancel)
    assert result.status == "cancelled" and service.list(user="local")[0].status == "cancelled"


def test_ctrl_c_during_run_inline_cancels_the_job(service):  # noqa: F811
    class Interrupted(FakeRunner):
        def __call__(self, spec, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_inline(service, "/srv/docs", client="c", runner=Interrupted())
    [info] = service.list(user="local")
    # stopped on purpose: not picked up again by a dispatcher, but `jobs resume` continues it
    assert info.status == "cancelled" and "jobs resume" in info.error
    assert service.resume(info.id, user="local").status == "queued"


def test_a_dispatcher_for_the_real_pipeline_needs_a_client(service):  # noqa: F811
    from embedfleet.errors import ConfigError

    with pytest.raises(ConfigError, match="needs client="):
        Dispatcher(service)


def test_run_inline_applies_admission_and_exact_quota(service, estimator):  # noqa: F811
    service.add_user("alice", tier="free")
    estimator.value = 5000
    with pytest.raises(QuotaExceeded, match="has only 1000"):
        run_inline(service, "/srv", client="c", user="alice", runner=FakeRunner())
    estimator.value = 10
    with pytest.raises(QuotaExceeded, match="has 2000 chunks to embed"):
        run_inline(service, "/srv", client="c", user="alice", runner=FakeRunner(chunks=2000))
    [failed] = service.list(user="alice")
    assert failed.status == "failed" and failed.charged == 0


def test_run_once_returns_what_it_ran(service):  # noqa: F811
    ids = {service.submit("/srv", user=u, collection="kb").id for u in ("a", "b", "c")}
    ran = run_once(service, client="c", runner=FakeRunner(), max_running=2)
    assert {i.id for i in ran} == ids and {i.status for i in ran} == {"succeeded"}
    assert run_once(service, client="c", runner=FakeRunner()) == []
