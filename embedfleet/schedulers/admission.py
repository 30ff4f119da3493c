"""Admission's SQL: what a user has running and holds, and what is left of today's quota.

Submit, resume and claim all decide on these same counts; keeping the expressions here means
the service, the dashboard and the dispatcher cannot disagree on what a job holds.
"""

from __future__ import annotations

from sqlalchemy import and_, bindparam, case, func, select

from embedfleet.schedulers.models import ACTIVE_STATUSES, WAITING_STATUSES, Job, Usage, User
from embedfleet.schedulers.priority import Tier


def max0(expr):
    return case((expr > 0, expr), else_=0)


def running_jobs(owner):
    """The count the tier's concurrency limit is about: the owner's running jobs, dispatched or
    inline, on every dispatcher. Claims and inline admissions check it under the owner's row lock."""
    return select(func.count()).where(Job.owner == owner, Job.status == "running")


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


def at_concurrency_limit(t: Tier, running: int) -> bool:
    return int(running or 0) >= t.concurrent_jobs


def admission_lock(*, notify: bool):
    """Lock the user's row, reading its tier.

    Its own statement, before the counts are read: under PostgreSQL's READ COMMITTED a
    statement's subqueries see the snapshot taken when it started, so counts read in the
    statement that waited for the lock would miss what the previous holder just committed.
    """
    columns = [User.tier.label("tier")]
    if notify:
        columns.append(func.pg_notify(bindparam("channel"), "").label("notified"))
    return select(*columns).where(User.id == bindparam("user")).with_for_update(of=User.__table__)


def admission_counts():
    """Everything admission checks about the (locked) user, in one round trip."""
    user = bindparam("user")
    return select(
        select(func.count()).where(Job.owner == user, Job.status.in_(WAITING_STATUSES)).scalar_subquery().label("waiting"),
        running_jobs(user).scalar_subquery().label("running"),
        select(Usage.chunks).where(Usage.user == user, Usage.day == bindparam("day")).scalar_subquery().label("used"),
        held_chunks(user).scalar_subquery().label("held"),
        select(func.count()).where(Job.owner == user, Job.started_at >= bindparam("since")).scalar_subquery().label("recent"),
    )

