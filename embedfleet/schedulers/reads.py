"""What the job database says, computed once: effective priority, what is left of a quota, job infos.

The owner API (``jobs status``, ``quota``), the dispatcher's ranking, the dashboard, the
Prometheus metrics and cron all read through here, so a job's effective priority and a user's
remaining quota are one formula each, whoever shows them:

* :func:`live_priority`: a waiting job's effective priority now (a job that is not waiting
  shows the priority it was dispatched at; :meth:`Reads.priorities`).
* :data:`HELD` and :func:`quota_left`: "left today" is the tier's daily chunks less the
  chunks charged today (UTC) less what the user's active jobs hold: a waiting job its
  estimate, a running one its exact count once checked, each less what it was charged.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import JobNotFound
from embedfleet.schedulers.models import (
    ACTIVE_STATUSES,
    WAITING_STATUSES,
    Job,
    Usage,
    User,
)
from embedfleet.schedulers.priority import (
    RECENT_WINDOW,
    PrioritySettings,
    Tier,
    effective_priority,
)
from embedfleet.schedulers.records import JobInfo, QuotaInfo
from embedfleet.schedulers.store import Store, default_tier, tier_of

__all__ = ["HELD", "Reads", "held_chunks", "live_priority", "max0", "quota_left"]


def max0(expr):
    return case((expr > 0, expr), else_=0)


#: Chunks of its owner's daily quota a job holds and has not been charged for yet. A running
#: job past the exact check after chunking holds what that check admitted, less what it was
#: charged since (``reserved``); any other active job holds its submit estimate, less what its
#: earlier runs were charged. Every admission counts what the owner's active jobs hold, so
#: jobs admitted one by one can never together be promised more than the quota.
HELD = case(
    (and_(Job.status == "running", Job.to_embed.is_not(None)), Job.reserved),
    else_=max0(Job.estimated_chunks - Job.charged),
)


def held_chunks(owner, *, exclude=None):
    """What the owner's active jobs hold (:data:`HELD`), summed; ``exclude``: a job id left out."""
    stmt = select(func.coalesce(func.sum(HELD), 0)).where(Job.owner == owner, Job.status.in_(ACTIVE_STATUSES))
    if exclude is not None:
        stmt = stmt.where(Job.id != exclude)
    return stmt


def quota_left(t: Tier, used: int, held: int) -> int | None:
    """What is left of today's quota: the tier's daily chunks less those charged today and those
    the user's active jobs hold; None for a tier without a daily limit."""
    if t.daily_chunks is None:
        return None
    return max(0, t.daily_chunks - int(used or 0) - int(held or 0))


def live_priority(base: float, t: Tier, *, recent_jobs: int, waiting_since: dt.datetime, now: dt.datetime,
                  settings: PrioritySettings) -> float:
    """A waiting job's effective priority at ``now``: its owner's tier, their jobs started in
    the last hour and how long it has waited (:func:`~embedfleet.schedulers.priority.effective_priority`)."""
    return effective_priority(base, multiplier=t.multiplier, recent_jobs=int(recent_jobs or 0),
                              waiting=now - waiting_since, settings=settings)


class Reads:
    """Read-only views of one job database (:class:`~embedfleet.schedulers.store.Store`)."""

    def __init__(self, store: Store):
        self.store = store

    def session(self, *, single: bool = False):
        """A read transaction, for a caller that reads several views at one snapshot."""
        return self.store.read(single=single)

    # -- priorities and job infos --------------------------------------------------------

    @staticmethod
    def recent_jobs(session: Session, users: Iterable[str], now: dt.datetime) -> dict[str, int]:
        """Each user's jobs started within :data:`~embedfleet.schedulers.priority.RECENT_WINDOW`."""
        users = list(set(users))
        if not users:
            return {}
        rows = session.execute(
            select(Job.owner, func.count())
            .where(Job.owner.in_(users), Job.started_at >= now - RECENT_WINDOW)
            .group_by(Job.owner)
        ).all()
        return {owner: int(n) for owner, n in rows}

    def priorities(self, session: Session, jobs: Sequence[Job], now: dt.datetime) -> list[float | None]:
        """Each job's effective priority: live for a waiting job, as dispatched for the others."""
        waiting = [j for j in jobs if j.status in WAITING_STATUSES]
        if not waiting:
            return [j.dispatch_priority for j in jobs]
        settings = PrioritySettings.from_config()
        owners = {j.owner for j in waiting}
        tier_names = dict(session.execute(select(User.id, User.tier).where(User.id.in_(owners))).all())
        recent = self.recent_jobs(session, owners, now)
        return [
            live_priority(j.priority, tier_of(tier_names.get(j.owner)), recent_jobs=recent.get(j.owner, 0),
                          waiting_since=j.queued_at, now=now, settings=settings)
            if j.status in WAITING_STATUSES else j.dispatch_priority
            for j in jobs
        ]

    def infos(self, session: Session, jobs: Sequence[Job], now: dt.datetime) -> list[JobInfo]:
        return [JobInfo.from_row(j, e) for j, e in zip(jobs, self.priorities(session, jobs, now))]

    def job(self, job_id: str) -> JobInfo:
        """Any job by id, without an owner check (admin, dispatcher and cron use)."""
        with self.store.read() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            return self.infos(session, [job], self.store.clock())[0]

    def job_status(self, job_id: str | None) -> str | None:
        """The job's status; None for no id or a job that is gone."""
        if not job_id:
            return None
        with self.store.read(single=True) as session:
            return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()

    # -- quotas --------------------------------------------------------------------------

    @staticmethod
    def held(session: Session, user: str, *, exclude: str | None = None) -> int:
        return int(session.execute(held_chunks(user, exclude=exclude)).scalar_one())

    def quotas(self, session: Session, users: Sequence[tuple[str, str | None]], now: dt.datetime) -> list[QuotaInfo]:
        """Today's quota of each ``(user id, tier name or None for a user not yet recorded)``."""
        ids = [u for u, _ in users]
        if not ids:
            return []
        day = self.store.today(now)
        used = dict(session.execute(select(Usage.user, Usage.chunks).where(Usage.day == day, Usage.user.in_(ids))).all())
        active: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"running": 0, "waiting": 0, "held": 0})
        for owner, status, n, held in session.execute(
            select(Job.owner, Job.status, func.count(), func.coalesce(func.sum(HELD), 0))
            .where(Job.owner.in_(ids), Job.status.in_(ACTIVE_STATUSES))
            .group_by(Job.owner, Job.status)
        ).all():
            active[owner]["running" if status == "running" else "waiting"] += int(n)
            active[owner]["held"] += int(held)
        queue_limit = int(config.get("jobs.queue-limit"))
        out = []
        for user, tier_name in users:
            t = tier_of(tier_name)
            u, a = int(used.get(user) or 0), active[user]
            out.append(QuotaInfo(
                user=user,
                tier=t.name,
                day=day,
                daily_limit=t.daily_chunks,
                used_today=u,
                reserved=a["held"],
                remaining=quota_left(t, u, a["held"]),
                concurrent_limit=t.concurrent_jobs,
                running=a["running"],
                queued=a["waiting"],
                queue_limit=queue_limit,
                known_user=tier_name is not None,
            ))
        return out

    def quota(self, user: str) -> QuotaInfo:
        """Today's (UTC) quota of ``user``; a user not recorded yet gets the default tier's."""
        with self.store.read() as session:
            now = self.store.clock()
            row = session.get(User, user)
            return self.quotas(session, [(user, row.tier if row else None)], now)[0]

    def user_quotas(self, session: Session, now: dt.datetime, *, user: str | None = None,
                    limit: int | None = None) -> list[QuotaInfo]:
        """Every recorded user's quota (or only ``user``'s), by user id."""
        stmt = select(User.id, User.tier).order_by(User.id)
        if user is not None:
            stmt = stmt.where(User.id == user)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self.quotas(session, [(u, t) for u, t in session.execute(stmt).all()], now)

    # -- totals (metrics) ----------------------------------------------------------------

    def totals_by_tier(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """Jobs by (status, owner's tier) and chunks charged today by tier."""
        tier = func.coalesce(User.tier, default_tier())
        with self.store.read() as session:
            today = self.store.today(self.store.clock())
            rows = session.execute(
                select(Job.status, tier, func.count())
                .select_from(Job)
                .outerjoin(User, User.id == Job.owner)
                .group_by(Job.status, tier)
            ).all()
            usage_rows = session.execute(
                select(tier, func.sum(Usage.chunks))
                .select_from(Usage)
                .outerjoin(User, User.id == Usage.user)
                .where(Usage.day == today)
                .group_by(tier)
            ).all()
        return {(s, t): int(n) for s, t, n in rows}, {t: int(n or 0) for t, n in usage_rows}

    # -- the dashboard's views -----------------------------------------------------------

    @staticmethod
    def shown_jobs(session: Session, now: dt.datetime, *, user: str | None = None,
                   finished_within: dt.timedelta = dt.timedelta(days=1), limit: int = 200) -> list[tuple[Job, str | None]]:
        """Every active job and those finished within ``finished_within``, newest first, with
        their owner's tier name (None: not recorded)."""
        stmt = (
            select(Job, User.tier)
            .outerjoin(User, User.id == Job.owner)
            .where(or_(Job.status.in_(ACTIVE_STATUSES), Job.finished_at >= now - finished_within))
        )
        if user is not None:
            stmt = stmt.where(Job.owner == user)
        return [(job, tier_name) for job, tier_name in session.execute(stmt.order_by(Job.created_at.desc()).limit(limit)).all()]

    @staticmethod
    def counts_by_status(session: Session, *, user: str | None = None) -> dict[str, int]:
        """Every job (or ``user``'s) by status."""
        stmt = select(Job.status, func.count()).group_by(Job.status)
        if user is not None:
            stmt = stmt.where(Job.owner == user)
        return {s: int(n) for s, n in session.execute(stmt).all()}
