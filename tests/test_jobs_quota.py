"""Quota and concurrency admission with the real job service (SQLite and PostgreSQL), racing for real.

* Admission counts what the user's queued and running jobs hold (their estimates, or their
  exact counts once checked), so jobs admitted one by one never add up to more than the quota,
  even when the submits race each other from separate connections.
* Inline runs (``embedfleet index``, :func:`~embedfleet.schedulers.dispatcher.run_inline`) obey the tier's concurrency
  limit with dispatched jobs, atomically; a refused one fails with one line.
* A ``sync``/``append`` into a collection that holds chunks is not refused on its estimate:
  unchanged chunks are free, and the exact count after chunking decides.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedfleet.errors import JobError, QuotaExceeded
from embedfleet.pipeline.manifest import Manifest
from embedfleet.schedulers.dispatcher import Dispatcher, run_inline
from embedfleet.schedulers.service import Candidate, Counts
from embedfleet.sinks.naming import physical_name
from tests.db import FakeEstimator, FakeRunner, clock, db_url, estimator, make_service, service, wait_for  # noqa: F401


def _charge(service, user, chunks, *, collection="used"):  # noqa: F811
    """Charge ``chunks`` to ``user`` today as a finished run that embedded them does."""
    job = service.submit("/srv/used", user=user, collection=collection)
    claim = service.ledger.claim(next(c for c in service.ledger.rank() if c.id == job.id), dispatcher="test")
    assert service.ledger.finish(claim, status="succeeded", counts=Counts(embedded=chunks), embedded=chunks)


def _race(n, target):
    """Run ``target(i)`` in ``n`` threads released at once; each outcome (a value or the exception)."""
    barrier = threading.Barrier(n)
    outcomes: list = [None] * n

    def run(i):
        barrier.wait()
        try:
            outcomes[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, outcomes


# --------------------------------------------------------------------------- what jobs hold


def test_queued_jobs_hold_their_estimates(service, estimator):  # noqa: F811
    """Four queued jobs estimated at 600 chunks each against a 1,000-chunk free quota: one is admitted."""
    estimator.value = 600
    first = service.submit("/srv", user="fr", collection="kb1")
    for i in range(2, 5):
        with pytest.raises(QuotaExceeded, match=r"needs about 600 chunks but user 'fr' has only 400 of today's 1000 "
                                                r"chunks left \(tier free: 0 charged today, 600 held by its waiting") as e:
            service.submit("/srv", user="fr", collection=f"kb{i}")
        assert (e.value.remaining, e.value.requested) == (400, 600)
    q = service.quota("fr")
    assert (q.used_today, q.reserved, q.remaining, q.queued) == (0, 600, 400, 1)
    estimator.value = 400
    service.submit("/srv", user="fr", collection="kb5")  # what is left still fits
    assert service.quota("fr").remaining == 0
    service.cancel(first.id, user="fr")  # a cancelled job holds nothing
    assert service.quota("fr").remaining == 600


def test_a_running_job_holds_its_estimate_then_its_exact_count_then_nothing(service, estimator):  # noqa: F811
    estimator.value = 300
    job = service.submit("/srv", user="fr", collection="kb")
    gate = threading.Event()
    runner = FakeRunner(chunks=200, tasks=4, gate=gate)
    d = Dispatcher(service, client="c", runner=runner, tick=0.02, poll_seconds=0.05)
    thread = threading.Thread(target=d.run, kwargs={"once": True}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: service.status(job.id, user="fr").to_embed == 200)  # past the exact check
        assert service.quota("fr").reserved == 200
        estimator.value = 801
        with pytest.raises(QuotaExceeded, match="has only 800 of"):
            service.submit("/srv", user="fr", collection="kb2")
    finally:
        gate.set()
        thread.join(20)
    info = service.status(job.id, user="fr")
    q = service.quota("fr")
    assert (info.status, info.charged, q.used_today, q.reserved, q.remaining) == ("succeeded", 200, 200, 0, 800)


def test_the_exact_check_counts_what_queued_jobs_hold(service, estimator):  # noqa: F811
    estimator.value = 100
    first = service.submit("/srv", user="fr", collection="kb")
    estimator.value = 700
    service.submit("/srv", user="fr", collection="kb2")  # holds 700 while it waits
    claim = service.ledger.claim(next(c for c in service.ledger.rank() if c.id == first.id), dispatcher="d")
    with pytest.raises(QuotaExceeded, match=r"has 301 chunks to embed but user 'fr' has only 300 of today's 1000 "
                                            r"chunks left \(tier free: 0 charged today, 700 held by its other jobs\)"):
        service.ledger.reserve(claim, 301)
    service.ledger.reserve(claim, 300)
    assert service.quota("fr").remaining == 0


@pytest.mark.parametrize("n", [8])
def test_racing_submits_never_promise_more_than_the_quota(db_url, tmp_path, clock, n):  # noqa: F811
    """Each submit from its own service (own engine and connections), all at once: exactly three
    300-chunk jobs fit in 1,000. On PostgreSQL the counts must be read after the user's row lock
    is taken, in a statement of their own, or a submit that waited for the lock counts from a
    snapshot older than the submit it waited for."""
    services = [make_service(db_url, tmp_path / "data", clock=clock, estimator=FakeEstimator(300)) for _ in range(n)]
    try:
        services[0].add_user("fr", tier="free")
        for _ in range(3):  # several rounds: each must hold
            threads, outcomes = _race(n, lambda i: services[i].submit("/srv", user="fr", collection=f"kb{i}"))
            for t in threads:
                t.join(30)
            admitted = [o for o in outcomes if not isinstance(o, BaseException)]
            assert len(admitted) == 3, outcomes
            assert all(isinstance(o, QuotaExceeded) for o in outcomes if o not in admitted), outcomes
            assert services[0].quota("fr").reserved == 900
            for job in admitted:
                services[0].cancel(job.id, user="fr")
    finally:
        for s in services:
            s.close()


# --------------------------------------------------------------------------- inline concurrency


def test_racing_inline_runs_obey_the_tier_concurrency(db_url, tmp_path, clock):  # noqa: F811
    """Four `embedfleet index --user fr2` runs of a free user (two at once) started together: two run, two
    are refused with one line saying the limit and how many run."""
    services = [make_service(db_url, tmp_path / "data", clock=clock) for _ in range(4)]
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    try:
        services[0].add_user("fr2", tier="free")
        threads, outcomes = _race(4, lambda i: run_inline(
            services[i], "/srv", client="c", user="fr2", collection=f"kb{i}", runner=runner))
        refused = wait_for(lambda: (r := [o for o in outcomes if isinstance(o, BaseException)]) and len(r) == 2 and r)
        wait_for(lambda: runner.active.get("fr2") == 2)
        for exc in refused:
            assert type(exc) is JobError, exc
            assert str(exc) == ("user 'fr2' already has 2 jobs running, the most tier free runs at once (2); wait for "
                                "one to finish (embedfleet jobs list --user fr2 --status running)")
            assert "\n" not in str(exc)
        assert services[0].quota("fr2").running == 2
    finally:
        gate.set()
        for t in threads:
            t.join(30)
        for s in services:
            s.close()
    assert runner.max_active["fr2"] == 2
    assert sorted(o.status for o in outcomes if not isinstance(o, BaseException)) == ["succeeded", "succeeded"]
    assert [j.status for j in services[0].list(user="fr2")] == ["succeeded", "succeeded"]  # the refused left no record


def test_inline_and_dispatched_jobs_share_the_limit(service, clock):  # noqa: F811
    service.add_user("fr2", tier="free")
    dispatched = service.submit("/srv", user="fr2", collection="a")
    clock.advance(1)  # picked second
    waiting = service.submit("/srv", user="fr2", collection="b")
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    d = Dispatcher(service, client="c", runner=runner, tick=0.02, poll_seconds=0.05, max_running=1)
    thread = threading.Thread(target=d.run, kwargs={"once": True}, daemon=True)
    thread.start()
    inline = None
    try:
        wait_for(lambda: service.status(dispatched.id, user="fr2").status == "running")
        inline = threading.Thread(
            target=run_inline, args=(service, "/srv"), kwargs=dict(client="c", user="fr2", collection="c", runner=runner),
            daemon=True,
        )
        inline.start()
        wait_for(lambda: runner.active.get("fr2") == 2)
        with pytest.raises(JobError, match=r"already has 2 jobs running, the most tier free runs at once \(2\)"):
            run_inline(service, "/srv", client="c", user="fr2", collection="d", runner=runner)
        # Dispatchers see the user at the limit too: the waiting job is neither offered nor claimable.
        assert service.ledger.rank() == []
        info = service.status(waiting.id, user="fr2")
        candidate = Candidate(info.id, "fr2", "free", info.priority, 50.0, info.queued_at, info.created_at)
        assert service.ledger.claim(candidate, dispatcher="other") is None
        assert service.status(waiting.id, user="fr2").status == "queued"
    finally:
        gate.set()
        thread.join(20)
        if inline is not None:
            inline.join(20)
    assert runner.max_active["fr2"] == 2
    assert {j.status for j in service.list(user="fr2")} == {"succeeded"}


def test_a_dead_inline_run_does_not_hold_a_slot(service):  # noqa: F811
    """Two SIGKILLed `embedfleet index` runs (on other collections) left their jobs running with
    nobody to end them: the next inline run of the user is not refused for them."""
    service.add_user("fr2", tier="free")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    dead = []
    for collection in ("a", "b"):
        job = service.submit("/srv", user="fr2", collection=collection)
        service.ledger.claim(next(c for c in service.ledger.rank() if c.id == job.id),
                      dispatcher=f"inline:{socket.gethostname()}:{dead_pid}:abc")
        dead.append(job.id)
    result = run_inline(service, "/srv", client="c", user="fr2", collection="c", runner=FakeRunner())
    assert result.status == "succeeded"
    for job_id in dead:
        info = service.status(job_id, user="fr2")
        assert info.status == "interrupted" and f"its process {dead_pid} on this host is gone" in info.error


# --------------------------------------------------------------------------- incremental estimates


def _seed_manifest(service, user, collection, chunks):  # noqa: F811
    """The manifest a committed job leaves for a collection of ``chunks`` chunks."""
    manifest = Manifest(service.data_dir, f"chroma://{service.data_dir}/chroma", physical_name(user, collection))
    version = manifest.new_version("seed")
    version.mkdir(parents=True)
    ids = [f"c{i}" for i in range(chunks)]
    pq.write_table(pa.table({"doc_id": [f"d{i // 10}" for i in range(chunks)], "chunk_id": ids}), version / "part-00000.parquet")
    manifest.commit(version)


def test_an_incremental_job_is_not_refused_on_its_estimate(service, estimator):  # noqa: F811
    """A no-change sync of a 600-chunk collection by a user with 150 left: admitted, holding its
    estimate less the manifest; only the exact count after chunking may refuse it."""
    service.add_user("syn", tier="free")
    _charge(service, "syn", 850)
    _seed_manifest(service, "syn", "kb", 600)
    estimator.value = 800  # the size estimate errs high: 200 more than the collection holds
    job = service.submit("/srv", user="syn", collection="kb")
    assert (job.status, job.estimated_chunks) == ("queued", 200)
    assert service.quota("syn").reserved == 200
    # Queued behind it, a new collection is still checked on its estimate.
    with pytest.raises(QuotaExceeded, match="needs about 800 chunks but user 'syn' has only 0 of"):
        service.submit("/srv", user="syn", collection="fresh")
    # So is a full rebuild, which embeds everything again.
    with pytest.raises(QuotaExceeded, match="needs about 800 chunks"):
        service.submit("/srv", user="syn", collection="kb", mode="full")

    # Unchanged: nothing to embed, nothing charged.
    Dispatcher(service, client="c", runner=FakeRunner(chunks=600, skipped=600), tick=0.02, poll_seconds=0.05).run(once=True)
    info = service.status(job.id, user="syn")
    assert (info.status, info.embedded, info.charged) == ("succeeded", 0, 0)
    # Changed beyond what is left: the exact count refuses it, before anything is embedded.
    changed = service.submit("/srv", user="syn", collection="kb", mode="append")
    runner = FakeRunner(chunks=600, skipped=400)
    Dispatcher(service, client="c", runner=runner, tick=0.02, poll_seconds=0.05).run(once=True)
    info = service.status(changed.id, user="syn")
    assert info.status == "failed" and "has 200 chunks to embed but user 'syn' has only 150 of" in info.error
    assert runner.tasks_done[changed.id] == 0 and service.quota("syn").used_today == 850
    # A resume is held to the same rule.
    assert service.resume(changed.id, user="syn").status == "queued"


def test_the_estimate_subtracts_the_manifest_only_for_incremental_modes(service, estimator):  # noqa: F811
    service.add_user("syn", tier="premium")
    _seed_manifest(service, "syn", "kb", 600)
    estimator.value = 650
    assert service.submit("/srv", user="syn", collection="kb").estimated_chunks == 50
    assert service.submit("/srv", user="syn", collection="kb", mode="append").estimated_chunks == 50
    assert service.submit("/srv", user="syn", collection="kb", mode="full").estimated_chunks == 650
    estimator.value = 400
    assert service.submit("/srv", user="syn", collection="kb").estimated_chunks == 0
    assert service.submit("/srv", user="syn", collection="other").estimated_chunks == 400
