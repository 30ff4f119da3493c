"""The dispatcher's ledger: ranking waiting jobs, claims, leases, charges and the end of runs.

What :class:`~embedfleet.schedulers.dispatcher.Dispatcher` and
:class:`~embedfleet.schedulers.execution.JobExecution` write about the jobs they run; the
owner API (:mod:`~embedfleet.schedulers.service`) never calls it.

* A claim is atomic and counts the owner's running jobs under their row lock, so dispatchers
  sharing the database never exceed a tier's concurrency limit; jobs on one collection run
  one at a time.
* Every write of a run is fenced by the claim's ``attempt``: a dispatcher that lost its lease
  can no longer touch the job.
* Every embedded chunk is charged exactly once: a job's charge is what it embedded over all
  its runs (its embedding partitions on disk) less what it was already charged, recorded
  with the job's counts in one transaction (:meth:`Ledger.heartbeat`, :meth:`Ledger.finish`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import JobCancelled, QuotaExceeded
from embedfleet.schedulers.admission import (
    at_concurrency_limit,
    left_phrase,
    running_jobs,
    running_unit,
)
from embedfleet.schedulers.lifecycle import transition
from embedfleet.schedulers.models import (
    ACTIVE_STATUSES,
    WAITING_STATUSES,
    Job,
    Usage,
    User,
)
from embedfleet.schedulers.priority import RECENT_WINDOW, PrioritySettings, Tier
from embedfleet.schedulers.reads import Reads, live_priority, max0, quota_left
from embedfleet.schedulers.records import Candidate, Claim, Counts, iso
from embedfleet.schedulers.store import (
    Store,
    collection_busy,
    dead_run_values,
    default_tier,
    tier_of,
)
from embedfleet.sinks.writer_lock import held_elsewhere

__all__ = ["Ledger"]

log = logging.getLogger(__name__)


def _rank_query():
    """Every waiting job with its owner's tier, running jobs and jobs started since ``since``."""
    running = (
        select(Job.owner.label("owner"), func.count(func.distinct(running_unit())).label("n"))
        .where(Job.status == "running")
        .group_by(Job.owner)
        .subquery("running_by_owner")
    )
    recent = (
        select(Job.owner.label("owner"), func.count().label("n"))
        .where(Job.started_at >= bindparam("since"))
        .group_by(Job.owner)
        .subquery("recent_by_owner")
    )
    return (
        select(
            Job.id,
            Job.owner,
            Job.priority,
            Job.queued_at,
            Job.created_at,
            Job.sink,
            Job.collection,
            Job.mode,
            Job.estimated_chunks,
            User.tier,
            running.c.n.label("running"),
            recent.c.n.label("recent"),
        )
        .select_from(Job)
        .outerjoin(User, User.id == Job.owner)
        .outerjoin(running, running.c.owner == Job.owner)
        .outerjoin(recent, recent.c.owner == Job.owner)
        .where(Job.status.in_(WAITING_STATUSES))
    )


_RANK = _rank_query()


class Ledger:
    """The dispatcher's side of one job database (:class:`~embedfleet.schedulers.store.Store`)."""

    def __init__(self, store: Store, reads: Reads):
        self.store = store
        self.reads = reads

    def has_active(self) -> bool:
        """Whether any job is queued, interrupted or running (on any dispatcher)."""
        with self.store.read(single=True) as session:
            return session.execute(select(Job.id).where(Job.status.in_(ACTIVE_STATUSES)).limit(1)).first() is not None

    def expire_leases(self, lease_seconds: float | None = None) -> list[str]:
        """Mark running jobs whose lease expired ``interrupted`` (to be resumed); return their ids.

        A job whose owner had asked to cancel it is marked ``cancelled`` instead. Leases are
        compared with this process's clock: keep dispatcher hosts' clocks in sync (NTP) to well
        under the lease.
        """
        lease = float(lease_seconds if lease_seconds is not None else config.seconds_value("jobs.lease-seconds"))
        now = self.store.clock()
        cutoff = now - dt.timedelta(seconds=lease)
        with self.store.read() as session:
            stale = session.execute(
                select(Job.id, Job.attempt, Job.dispatcher, Job.heartbeat_at, Job.cancel_requested).where(
                    Job.status == "running", Job.heartbeat_at < cutoff
                )
            ).all()
        expired = []
        for job_id, attempt, dispatcher, heartbeat, cancel_requested in stale:
            why = f"dispatcher {dispatcher} stopped renewing its lease (last heartbeat {iso(heartbeat)})"
            values = dead_run_values(cancel_requested, why, now)
            with self.store.write() as session:
                result = session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.attempt == attempt, Job.status == "running", Job.heartbeat_at < cutoff)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    self.store.notify(session)
                    expired.append(job_id)
                    log.warning("job %s: lease of dispatcher %s expired; marked %s", job_id, dispatcher, values["status"])
        return expired

    def rank(self, *, now: dt.datetime | None = None) -> list[Candidate]:
        """Waiting jobs whose owner is below their tier's concurrency limit, best first.

        Order: effective priority (highest first), then the oldest submission, then the id.
        """
        now = now or self.store.clock()
        settings = PrioritySettings.from_config()
        with self.store.read(single=True) as session:
            waiting = session.execute(_RANK, {"since": now - RECENT_WINDOW}).all()
        tier_cache: dict[str, Tier] = {}
        out = []
        for w in waiting:
            name = w.tier or default_tier()
            t = tier_cache.get(name) or tier_cache.setdefault(name, tier_of(name))
            if at_concurrency_limit(t, w.running):
                continue
            eff = live_priority(w.priority, t, recent_jobs=w.recent, waiting_since=w.queued_at, now=now, settings=settings)
            out.append(Candidate(w.id, w.owner, t.name, w.priority, eff, w.queued_at, w.created_at,
                                 sink=w.sink, collection=w.collection, mode=w.mode,
                                 estimated_chunks=int(w.estimated_chunks or 0)))
        out.sort(key=lambda c: (-c.effective, c.created_at, c.id))
        return out

    def claim(self, candidate: Candidate, *, dispatcher: str, batch: str | None = None,
              joins: Callable[[str], bool] | None = None) -> Claim | None:
        """Atomically take a waiting job for ``dispatcher``; None if another got it or its owner is at the limit.

        PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` on the job, then the owner's row is
        locked while their running jobs are counted, so two dispatchers never exceed a user's
        concurrency limit. SQLite: the write transaction holds the database lock and the
        update is conditional on the job still waiting (rowcount checked).

        With ``batch``, the job runs in that batch of coalesced jobs: as its first job, or, with
        ``joins`` (true for a spec that may join the batch), beside the batch's jobs already
        running, on its collection or another. The pass counts once against each owner's
        concurrency limit: a job joining a batch its owner already has a job in takes no slot.
        """
        with self.store.write() as session:
            now = self.store.clock()
            row = session.execute(
                select(Job.id, Job.owner, Job.attempt, Job.spec, Job.sink, Job.collection)
                .where(Job.id == candidate.id, Job.status.in_(WAITING_STATUSES))
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            if joins is not None and not joins(row.spec):
                return None  # its options differ from the batch's: it runs on its own later
            user = self.store.lock_user(session, row.owner)
            t = tier_of(user.tier if user else None)
            in_batch = joins is not None and session.execute(
                select(Job.id).where(Job.owner == row.owner, Job.status == "running", Job.batch == batch).limit(1)
            ).first() is not None
            if not in_batch and at_concurrency_limit(t, session.execute(running_jobs(row.owner)).scalar_one()):
                return None
            if collection_busy(session, row.owner, row.sink, row.collection,
                               batch=batch if joins is not None else None) is not None:
                return None  # waits until the job on its collection ends
            if held_elsewhere(row.sink) is not None:
                return None  # an embedded store another process writes: waits until it lets go
            result = session.execute(
                update(Job)
                .where(Job.id == row.id, Job.attempt == row.attempt, Job.status.in_(WAITING_STATUSES))
                .values(transition("claim", WAITING_STATUSES, "running", {
                    "stage": "reading",
                    "attempt": row.attempt + 1,
                    "dispatcher": dispatcher,
                    "started_at": now,
                    "heartbeat_at": now,
                    "finished_at": None,
                    "dispatch_priority": candidate.effective,
                    "cancel_requested": False,
                    "reserved": 0,
                    "to_embed": None,
                    "error": None,
                    "batch": batch,
                }))
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                return None
        return Claim(id=row.id, owner=row.owner, attempt=row.attempt + 1, spec=row.spec, priority=candidate.effective)

    def charge(self, session: Session, user: str, delta: int, now: dt.datetime) -> None:
        if delta <= 0:
            return
        insert = self.store.insert()
        stmt = insert(Usage).values(user=user, day=self.store.today(now), chunks=delta)
        stmt = stmt.on_conflict_do_update(
            index_elements=["user", "day"], set_={"chunks": Usage.chunks + stmt.excluded.chunks}
        )
        session.execute(stmt)

    def fence(self, claim: Claim):
        return and_(Job.id == claim.id, Job.attempt == claim.attempt, Job.status == "running")

    def settle(self, session: Session, claim: Claim, embedded: int | None, now: dt.datetime) -> tuple[Job, dict[str, Any]] | None:
        """Lock the claimed job and charge what it embedded and was not charged for yet.

        ``embedded`` is everything the job embedded over all its runs (the dispatcher counts
        its embedding partitions on disk), so the charge is that total less the job's
        ``charged``: a slice finished after a cancel is charged by the next run that sees it,
        and a repeated report charges nothing twice. Returns the job (None if the claim was
        lost) and the column values that record the charge.
        """
        job = session.execute(
            select(Job.charged, Job.cancel_requested).where(self.fence(claim)).with_for_update()
        ).first()
        if job is None:
            return None
        delta = max(0, int(embedded) - job.charged) if embedded is not None else 0
        if delta == 0:
            return job, {}
        self.charge(session, claim.owner, delta, now)
        return job, dict(charged=job.charged + delta, reserved=max0(Job.reserved - delta))

    def heartbeat(self, claim: Claim, *, counts: Counts | None = None, embedded: int | None = None) -> bool | None:
        """Renew the lease, store counts and charge what is newly embedded, in one transaction.

        ``embedded``: the job's embedded chunks over all its runs (see :meth:`settle`); None
        when unchanged since the last report. Returns the job's ``cancel_requested``, or None
        when the job is no longer this claim's (its lease expired and it was interrupted):
        the caller must stop it.
        """
        return self.heartbeat_many([(claim, counts, embedded)])[0]

    def heartbeat_many(self, beats: list[tuple[Claim, Counts | None, int | None]]) -> list[bool | None]:
        """:meth:`heartbeat` for many jobs (a batch's) in one transaction: ``(claim, counts,
        embedded)`` each; their ``cancel_requested`` (None: lost), in order."""
        out: list[bool | None] = []
        with self.store.write() as session:
            now = self.store.clock()
            for claim, counts, embedded in beats:
                out.append(self._beat(session, now, claim, counts, embedded))
        return out

    def _beat(self, session: Session, now: dt.datetime, claim: Claim, counts: Counts | None,
              embedded: int | None) -> bool | None:
        values: dict[str, Any] = dict(counts.values()) if counts else {}
        if embedded is None:  # nothing to charge: one statement
            row = session.execute(
                update(Job).where(self.fence(claim)).values(heartbeat_at=now, **values).returning(Job.cancel_requested)
                .execution_options(synchronize_session=False)
            ).first()
            return None if row is None else bool(row[0])
        settled = self.settle(session, claim, embedded, now)
        if settled is None:
            return None
        job, charged = settled
        session.execute(
            update(Job).where(self.fence(claim)).values(heartbeat_at=now, **values, **charged)
            .execution_options(synchronize_session=False)
        )
        return bool(job.cancel_requested)

    def poll(self, claim: Claim) -> bool | None:
        """``cancel_requested`` of a claimed job without writing; None if the claim was lost."""
        return self.poll_many([claim])[0]

    def poll_many(self, claims: list[Claim]) -> list[bool | None]:
        """:meth:`poll` for many jobs (a batch's) in one query."""
        with self.store.read(single=True) as session:
            rows = session.execute(
                select(Job.id, Job.attempt, Job.cancel_requested)
                .where(Job.id.in_([c.id for c in claims]), Job.status == "running")
            ).all()
        found = {(r.id, r.attempt): bool(r.cancel_requested) for r in rows}
        return [found.get((c.id, c.attempt)) for c in claims]

    def reserve(self, claim: Claim, chunks: int, *, embedded: int = 0) -> None:
        """The exact check after chunking: admit ``chunks`` to be embedded or raise QuotaExceeded.

        ``embedded`` is what the job embedded over all its runs so far (:meth:`settle`): what
        of it was not charged yet (slices an earlier run finished after it was stopped) is
        charged by this run, so it is part of what must fit. What is admitted is held
        (:data:`HELD`) until it is charged or the job ends.
        """
        refused = self.reserve_many([(claim, chunks, embedded)])[0]
        if refused is not None:
            raise refused

    def reserve_many(self, asks: list[tuple[Claim, int, int]]) -> list[QuotaExceeded | JobCancelled | None]:
        """:meth:`reserve` for many jobs of one owner (a batch's), in order, in one transaction:
        ``(claim, chunks, embedded)`` each; the refusal of each (None: admitted). What one job
        is admitted counts against the jobs after it."""
        out: list[QuotaExceeded | JobCancelled | None] = []
        if not asks:
            return out
        with self.store.write() as session:
            now = self.store.clock()
            owners = {claim.owner for claim, _, _ in asks}
            tiers = {}
            for owner in sorted(owners):
                user = self.store.lock_user(session, owner)
                tiers[owner] = tier_of(user.tier if user else None)
            for claim, chunks, embedded in asks:
                out.append(self._reserve(session, now, tiers[claim.owner], claim, int(chunks), int(embedded)))
        return out

    def _reserve(self, session: Session, now: dt.datetime, t: Tier, claim: Claim, chunks: int,
                 embedded: int) -> QuotaExceeded | JobCancelled | None:
        job = session.execute(select(Job.charged).where(self.fence(claim)).with_for_update()).first()
        if job is None:
            return JobCancelled(f"job {claim.id} is no longer running on this dispatcher")
        uncharged = max(0, embedded - job.charged)
        needed = chunks + uncharged
        used, held = self.store.used_today(session, claim.owner, self.store.today(now)), self.reads.held(session, claim.owner, exclude=claim.id)
        remaining = quota_left(t, used, held)
        if remaining is not None and needed > remaining:
            earlier = f" (and {uncharged} its earlier run embedded, not charged yet)" if uncharged else ""
            return QuotaExceeded(
                f"quota exceeded: job {claim.id} has {chunks} chunks to embed{earlier} but user {claim.owner!r} "
                f"{left_phrase(t, remaining, used, held, holders='its other jobs')}; nothing was embedded",
                remaining=remaining,
                requested=needed,
            )
        session.execute(
            update(Job).where(self.fence(claim)).values(reserved=needed, to_embed=chunks, heartbeat_at=now)
            .execution_options(synchronize_session=False)
        )
        return None

    def finish(
        self,
        claim: Claim,
        *,
        status: str,
        counts: Counts | None = None,
        embedded: int | None = None,
        error: str | None = None,
    ) -> bool:
        """Record the end of a run, charging what is left to charge (:meth:`settle`) in the same
        transaction; False if the claim was lost."""
        return self.finish_many([(claim, status, counts, embedded, error)])[0]

    def finish_many(self, ends: list[tuple[Claim, str, Counts | None, int | None, str | None]]) -> list[bool]:
        """:meth:`finish` for many jobs (a batch's) in one transaction: ``(claim, status, counts,
        embedded, error)`` each; whether each was recorded, in order."""
        out = []
        with self.store.write() as session:
            now = self.store.clock()
            for claim, status, counts, embedded, error in ends:
                out.append(self._end(session, now, claim, status, counts, embedded, error))
            if any(out):
                self.store.notify(session)  # a slot is free
        return out

    def _end(self, session: Session, now: dt.datetime, claim: Claim, status: str, counts: Counts | None,
             embedded: int | None, error: str | None) -> bool:
        values: dict[str, Any] = dict(counts.values()) if counts else {}
        settled = self.settle(session, claim, embedded, now)
        if settled is None:
            return False
        values.update(settled[1], error=error, reserved=0, heartbeat_at=None)
        if status == "interrupted":  # to be resumed by any dispatcher, waiting from now
            values = transition("requeue", "running", status, dict(values, queued_at=now, dispatcher=None))
        else:
            if status == "succeeded":
                values["stage"] = "done"
            values = transition("end", "running", status, dict(values, finished_at=now))
        session.execute(
            update(Job).where(self.fence(claim)).values(**values).execution_options(synchronize_session=False)
        )
        return True

    def interrupt_dispatcher(self, dispatcher: str, *, why: str = "stopped") -> list[str]:
        """Mark every job still running on ``dispatcher`` interrupted (its shutdown); their ids.

        ``why`` completes "dispatcher <name> ..." in the jobs' error.
        """
        with self.store.write() as session:
            now = self.store.clock()
            ids = list(
                session.execute(
                    update(Job)
                    .where(Job.dispatcher == dispatcher, Job.status == "running")
                    .values(transition("requeue", "running", "interrupted", {
                        "queued_at": now,
                        "dispatcher": None,
                        "reserved": 0,
                        "heartbeat_at": None,
                        "error": f"interrupted: dispatcher {dispatcher} {why}; the job will be resumed",
                    }))
                    .returning(Job.id)
                    .execution_options(synchronize_session=False)
                ).scalars()
            )
            if ids:
                self.store.notify(session)
        return ids
