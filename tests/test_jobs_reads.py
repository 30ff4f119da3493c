"""One read model: the owner API, the dispatcher's ranking, the dashboard and cron see the same
effective priority and the same remaining quota (embedfleet.schedulers.reads)."""

import pytest

from embedfleet.dashboard.data import take_snapshot
from tests.db import clock, db_url, estimator, service  # noqa: F401


def test_every_reader_sees_one_effective_priority(service, clock):  # noqa: F811
    service.add_user("pat", tier="premium")
    first = service.submit("/srv", user="fred", collection="a", priority=40)
    [candidate] = service.ledger.rank()
    claim = service.ledger.claim(candidate, dispatcher="test")  # fred now has a job started this hour
    assert service.ledger.finish(claim, status="succeeded")
    waiting = [
        service.submit("/srv", user="fred", collection="b", priority=40),
        service.submit("/srv", user="pat", collection="c", priority=55),
    ]
    clock.advance(minutes=4)

    ranked = {c.id: c.effective for c in service.ledger.rank()}
    shown = {j.id: j.effective_priority for j in take_snapshot(service).jobs}
    for job in waiting:
        status = service.status(job.id, user=job.user).effective_priority
        assert status == pytest.approx(ranked[job.id]) == pytest.approx(shown[job.id])
    # fred: 40 * 1.0 - 2 (one job started this hour) + 2/min * 4 min; pat: 55 * premium 2.0 + 8
    assert ranked[waiting[0].id] == pytest.approx(46) and ranked[waiting[1].id] == pytest.approx(118)
    # A job that is not waiting shows the priority it was dispatched at, everywhere.
    assert service.status(first.id, user="fred").effective_priority == shown[first.id] == pytest.approx(40)


def test_every_reader_sees_one_remaining_quota(service, estimator):  # noqa: F811
    estimator.value = 300
    running = service.submit("/srv", user="fred", collection="a")
    [candidate] = service.ledger.rank()
    claim = service.ledger.claim(candidate, dispatcher="test")
    service.ledger.reserve(claim, 120)  # the exact count after chunking replaces the estimate
    service.submit("/srv", user="fred", collection="b")  # waiting: holds its estimate
    quota = service.quota("fred")
    assert (quota.reserved, quota.remaining, quota.running, quota.queued) == (420, 1000 - 420, 1, 1)
    [row] = [u for u in take_snapshot(service).usage if u.user == "fred"]
    assert (row.reserved, row.remaining, row.running, row.waiting) == (420, 580, 1, 1)
    with service.reads.session() as session:
        [many] = service.reads.user_quotas(session, service.clock(), user="fred")
    assert many == quota
    # The exact check of the running job counts what the others hold the same way.
    service.ledger.reserve(claim, 1000 - 300)
    assert service.quota("fred").remaining == 0
    assert service.job(running.id).to_embed == 700
