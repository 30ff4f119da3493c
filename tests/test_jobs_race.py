"""Dispatchers racing over one database never run a job twice nor break a tier's concurrency."""

from __future__ import annotations

import collections
import threading

import dask.config

from embedfleet.schedulers.dispatcher import Dispatcher
from tests.db import FakeRunner, db_url, make_service  # noqa: F401

USERS = 8
JOBS_PER_USER = 8


def test_two_dispatchers_run_every_job_exactly_once(db_url, tmp_path):  # noqa: F811
    submitter = make_service(db_url, tmp_path / "data")
    with dask.config.set({"embedfleet.jobs.queue-limit": 1000}):
        expected = {
            submitter.submit("/srv", user=f"user-{u}", collection="kb").id
            for _ in range(JOBS_PER_USER)
            for u in range(USERS)
        }
    runner = FakeRunner(task_seconds=0.002)  # shared: it sees the concurrency of both dispatchers
    services = [make_service(db_url, tmp_path / "data") for _ in range(2)]
    dispatchers = [
        Dispatcher(s, client=None, runner=runner, max_running=4, tick=0.05, poll_seconds=0.05, name=f"d{i}")
        for i, s in enumerate(services)
    ]
    errors = []

    def run(d):
        try:
            d.run(once=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in dispatchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    runs = collections.Counter(c["job_id"] for c in runner.calls)
    assert set(runs) == expected
    assert set(runs.values()) == {1}  # exactly once
    assert max(runner.max_active.values()) <= 2  # free tier: 2 at once, across both dispatchers
    infos = [j for u in range(USERS) for j in submitter.list(user=f"user-{u}")]
    assert {(j.status, j.attempt) for j in infos} == {("succeeded", 1)}
    by_dispatcher = collections.Counter(j.dispatcher for j in infos)
    assert set(by_dispatcher) == {"d0", "d1"}  # both took part
    for s in [submitter, *services]:
        s.close()
