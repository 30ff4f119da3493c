"""JobService admission, visibility, cancel/resume, users and quota (SQLite and PostgreSQL)."""

from __future__ import annotations

import dask.config
import pytest

from embedfleet.errors import ConfigError, JobError, JobNotFound, PermissionDenied, QueueFull, QuotaExceeded
from embedfleet.schedulers.service import Counts
from tests.db import FakeEstimator, clock, db_url, estimator, make_service, service  # noqa: F401

STATUS_KEYS = {
    "id", "user", "status", "stage", "priority", "effective_priority", "documents", "chunks", "embedded",
    "skipped", "created_at", "started_at", "finished_at", "error",
}


def _charge(service, user, chunks):
    """Charge ``chunks`` to ``user`` today the way a finished run does."""
    job = service.submit("/srv/x", user=user, collection="kb")
    cand = next(c for c in service.ledger.rank() if c.id == job.id)
    claim = service.ledger.claim(cand, dispatcher="test")
    assert service.ledger.finish(claim, status="succeeded", counts=Counts(embedded=chunks), embedded=chunks)
    return job.id


def test_submit_queues_a_job(service, estimator):  # noqa: F811
    estimator.value = 42
    job = service.submit("/srv/docs", user="alice", collection="kb", priority=70, mode="full", chunk_size=64,
                         chunk_overlap=8, chunk_unit="words")
    assert len(job.id) == 12 and int(job.id, 16) >= 0
    assert (job.user, job.status, job.stage, job.priority) == ("alice", "queued", "queued", 70)
    assert job.effective_priority == 70  # free tier, no recent jobs, not waited yet
    assert (job.chunk_unit, job.chunk_size, job.chunk_overlap, job.mode) == ("words", 64, 8, "full")
    assert job.estimated_chunks == 42 and job.source == "/srv/docs" and job.collection == "kb"
    assert STATUS_KEYS <= set(job.to_dict())
    again = service.status(job.id, user="alice")
    assert again.to_dict() == job.to_dict()
    assert [j.id for j in service.list(user="alice")] == [job.id]


def test_unknown_users_are_created_at_the_default_tier(service):  # noqa: F811
    assert service.get_user("alice") is None
    service.submit("/srv", user="alice", collection="kb")
    assert service.get_user("alice").tier == "free"
    with dask.config.set({"embedfleet.jobs.default-tier": "premium"}):
        service.submit("/srv", user="bob", collection="kb")
    assert service.get_user("bob").tier == "premium"
    # the submitter has no way to pick a tier: an existing user keeps theirs
    service.submit("/srv", user="alice", collection="kb")
    assert service.get_user("alice").tier == "free"
    # the user `embedfleet index` runs as is created at the local tier, whoever sees it first
    service.submit("/srv", user="local", collection="kb")
    assert service.get_user("local").tier == "unlimited"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"user": "Alice"}, "invalid user id 'Alice'"),
        ({"user": "a/b"}, "invalid user id"),
        ({"user": "x" * 61}, "invalid user id"),
        ({"collection": "-kb"}, "invalid collection name '-kb'"),
        ({"collection": "k b"}, "invalid collection name"),
        ({"priority": 101}, "priority must be an integer from 0 to 100"),
        ({"priority": -1}, "priority must be"),
        ({"mode": "incremental"}, "mode must be one of sync, append, full"),
    ],
)
def test_submit_validates(service, kwargs, match):  # noqa: F811
    args = {"user": "alice", "collection": "kb", **kwargs}
    with pytest.raises(ConfigError, match=match):
        service.submit("/srv", **args)
    assert service.list_users() == [] or args["user"] == "alice"


def test_quota_refusal_names_the_exact_remaining_amount(service, estimator):  # noqa: F811
    estimator.value = 1001
    with pytest.raises(QuotaExceeded, match=r"needs about 1001 chunks but user 'alice' has only 1000 of today's 1000") as e:
        service.submit("/srv", user="alice", collection="kb")
    assert (e.value.remaining, e.value.requested) == (1000, 1001)
    assert service.list(user="alice") == []
    assert service.get_user("alice") is None  # the refused submit left nothing behind

    estimator.value = 10
    _charge(service, "alice", 400)
    estimator.value = 601
    with pytest.raises(QuotaExceeded, match="has only 600 of today's 1000") as e:
        service.submit("/srv", user="alice", collection="kb")
    assert e.value.remaining == 600
    estimator.value = 600
    service.submit("/srv", user="alice", collection="kb")  # exactly what is left fits
    q = service.quota("alice")
    # The queued job holds its estimate: nothing is left for another one.
    assert (q.daily_limit, q.used_today, q.reserved, q.remaining, q.queued) == (1000, 400, 600, 0, 1)


def test_quota_resets_on_the_next_utc_day(service, estimator, clock):  # noqa: F811
    _charge(service, "alice", 1000)
    estimator.value = 1
    with pytest.raises(QuotaExceeded, match="has only 0 of"):
        service.submit("/srv", user="alice", collection="kb")
    clock.advance(hours=24)
    service.submit("/srv", user="alice", collection="kb")
    assert service.quota("alice").used_today == 0


def test_unlimited_tier_has_no_quota(service, estimator):  # noqa: F811
    service.add_user("big", tier="unlimited")
    estimator.value = 10**9
    service.submit("/srv", user="big", collection="kb")
    q = service.quota("big")
    assert q.daily_limit is None and q.remaining is None


def test_queue_limit(service):  # noqa: F811
    with dask.config.set({"embedfleet.jobs.queue-limit": 3}):
        ids = [service.submit("/srv", user="alice", collection="kb").id for _ in range(3)]
        with pytest.raises(QueueFull, match="user 'alice' already has 3 jobs waiting \\(queue limit 3\\)"):
            service.submit("/srv", user="alice", collection="kb")
        service.submit("/srv", user="bob", collection="kb")  # per user
        service.cancel(ids[0], user="alice")
        service.submit("/srv", user="alice", collection="kb")


def test_allowed_roots(service, tmp_path):  # noqa: F811
    inside = tmp_path / "corpora" / "a"
    inside.mkdir(parents=True)
    with dask.config.set({"embedfleet.jobs.allowed-roots": [str(tmp_path / "corpora")]}):
        service.submit(str(inside), user="alice", collection="kb")
        service.submit("builtin:python-docs", user="alice", collection="kb")
        for bad in ["/etc", str(tmp_path / "corpora-evil"), str(inside / ".." / ".." / "x")]:
            with pytest.raises(PermissionDenied, match="outside the allowed roots"):
                service.submit(bad, user="alice", collection="kb")
    service.submit("/etc", user="alice", collection="kb")  # no roots configured: anything


def test_other_users_jobs_are_invisible(service):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    with pytest.raises(JobNotFound) as other:
        service.status(job.id, user="mallory")
    with pytest.raises(JobNotFound) as missing:
        service.status("0123456789ab", user="mallory")
    # exactly like a missing id: same type, same message shape, nothing about the owner
    assert str(other.value).replace(job.id, "ID") == str(missing.value).replace("0123456789ab", "ID")
    assert "alice" not in str(other.value)
    assert service.list(user="mallory") == []
    with pytest.raises(PermissionDenied):
        service.cancel(job.id, user="mallory")
    with pytest.raises(PermissionDenied):
        service.resume(job.id, user="mallory")
    with pytest.raises(JobNotFound):
        service.cancel("0123456789ab", user="mallory")
    assert service.status(job.id, user="alice").status == "queued"


def test_cancel_queued_and_running(service):  # noqa: F811
    queued = service.submit("/srv", user="alice", collection="kb")
    info = service.cancel(queued.id, user="alice")
    assert info.status == "cancelled" and info.finished_at is not None
    assert service.cancel(queued.id, user="alice").status == "cancelled"  # idempotent

    running = service.submit("/srv", user="alice", collection="kb")
    claim = service.ledger.claim(service.ledger.rank()[0], dispatcher="d1")
    assert claim.id == running.id
    info = service.cancel(running.id, user="alice")
    assert info.status == "running" and info.cancel_requested
    assert service.ledger.heartbeat(claim) is True  # the dispatcher's watcher sees it
    service.ledger.finish(claim, status="cancelled")
    assert service.status(running.id, user="alice").status == "cancelled"

    done = service.submit("/srv", user="alice", collection="kb")
    claim = service.ledger.claim(service.ledger.rank()[0], dispatcher="d1")
    service.ledger.finish(claim, status="succeeded")
    with pytest.raises(JobError, match="already succeeded"):
        service.cancel(done.id, user="alice")


def test_resume_keeps_the_id(service, clock):  # noqa: F811
    job = service.submit("/srv", user="alice", collection="kb")
    claim = service.ledger.claim(service.ledger.rank()[0], dispatcher="d1")
    service.ledger.finish(claim, status="failed", error="SinkError: down")
    with pytest.raises(JobError, match="only interrupted, failed or cancelled"):
        service.resume(service.submit("/srv", user="alice", collection="kb").id, user="alice")
    clock.advance(60)
    info = service.resume(job.id, user="alice")
    assert (info.id, info.status, info.error, info.finished_at) == (job.id, "queued", None, None)
    assert info.queued_at == clock()
    claim2 = service.ledger.claim(next(c for c in service.ledger.rank() if c.id == job.id), dispatcher="d2")
    assert claim2.attempt == claim.attempt + 1


def test_list_filters_and_orders(service, clock):  # noqa: F811
    a = service.submit("/srv", user="alice", collection="kb")
    clock.advance(1)
    b = service.submit("/srv", user="alice", collection="kb")
    clock.advance(1)
    c = service.submit("/srv", user="alice", collection="kb")
    service.cancel(b.id, user="alice")
    assert [j.id for j in service.list(user="alice")] == [c.id, b.id, a.id]
    assert [j.id for j in service.list(user="alice", status="queued")] == [c.id, a.id]
    assert [j.id for j in service.list(user="alice", status=["cancelled"])] == [b.id]
    assert [j.id for j in service.list(user="alice", limit=1)] == [c.id]
    with pytest.raises(ConfigError, match="unknown job status 'done'"):
        service.list(user="alice", status="done")


def test_users_admin(service):  # noqa: F811
    assert service.add_user("alice", tier="premium").tier == "premium"
    assert service.add_user("bob").tier == "free"
    with pytest.raises(ConfigError, match="already exists"):
        service.add_user("alice", tier="free")
    with pytest.raises(ConfigError, match="unknown tier 'gold'"):
        service.add_user("carol", tier="gold")
    assert service.set_tier("alice", "enterprise").tier == "enterprise"
    with pytest.raises(ConfigError, match="unknown user 'zed'"):
        service.set_tier("zed", "free")
    with pytest.raises(ConfigError, match="unknown tier"):
        service.set_tier("alice", "gold")
    assert [(u.id, u.tier) for u in service.list_users()] == [("alice", "enterprise"), ("bob", "free")]


def test_quota_of_an_unknown_user_shows_defaults_without_creating_it(service):  # noqa: F811
    q = service.quota("nobody")
    assert (q.tier, q.daily_limit, q.used_today, q.remaining, q.concurrent_limit, q.known_user) == (
        "free", 1000, 0, 1000, 2, False
    )
    assert service.get_user("nobody") is None
    assert set(q.to_dict()) >= {"tier", "daily_limit", "used_today", "remaining", "concurrent_limit", "running"}


def test_submit_reads_no_file_and_uses_one_estimate(service, estimator, tmp_path):  # noqa: F811
    service.submit(str(tmp_path / "does-not-exist"), user="alice", collection="kb")
    assert estimator.calls == 1


def test_submit_recovers_when_a_known_user_row_disappears(service):  # noqa: F811
    import sqlalchemy as sa

    service.submit("/srv", user="alice", collection="kb")
    with service.engine.begin() as conn:  # e.g. an admin reset the tables under a running service
        conn.execute(sa.text("DELETE FROM ef_jobs"))
        conn.execute(sa.text("DELETE FROM ef_users"))
    job = service.submit("/srv", user="alice", collection="kb")
    assert service.status(job.id, user="alice").status == "queued"
    assert service.get_user("alice").tier == "free"
