"""What the jobs dashboard shows, read from the job database (no Bokeh here).

:func:`take_snapshot` reads, in one read transaction, the jobs worth showing (every queued,
interrupted or running job, and those that finished in the last day), today's usage against
each user's tier, the job counts by status, and the Dask dashboard link a dispatcher recorded.
:class:`RateTracker` turns successive snapshots into chunks/s per job and in total.

The dispatcher records its cluster's dashboard link with :func:`record_dask_dashboard` under
the key ``dask_dashboard`` of the ``ef_meta`` table (a key-value table; no schema change).
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from embedfleet.schedulers.models import WAITING_STATUSES, Job, Meta
from embedfleet.schedulers.store import tier_of

__all__ = [
    "DASK_DASHBOARD_KEY",
    "JobRow",
    "RateTracker",
    "Snapshot",
    "UsageRow",
    "dask_dashboard_link",
    "record_dask_dashboard",
    "take_snapshot",
]

log = logging.getLogger(__name__)

DASK_DASHBOARD_KEY = "dask_dashboard"
_STATUS_ORDER = {"running": 0, "interrupted": 1, "queued": 2, "failed": 3, "cancelled": 4, "succeeded": 5}


def record_dask_dashboard(service: Any, link: str | None) -> None:
    """Remember ``link`` (the dispatcher's ``client.dashboard_link``) for the jobs dashboard."""
    if not link:
        return
    if len(link) > 255:
        log.warning("Dask dashboard link too long to record (%d chars): %s", len(link), link[:80])
        return
    for _ in range(2):  # two dispatchers inserting the key at once: the loser updates
        try:
            with service.store.write() as session:
                row = session.get(Meta, DASK_DASHBOARD_KEY, with_for_update=True)
                if row is None:
                    session.add(Meta(key=DASK_DASHBOARD_KEY, value=link))
                else:
                    row.value = link
            return
        except IntegrityError:
            continue


def dask_dashboard_link(service: Any) -> str | None:
    with service.reads.session(single=True) as session:
        return session.execute(select(Meta.value).where(Meta.key == DASK_DASHBOARD_KEY)).scalar_one_or_none()


@dataclass(frozen=True)
class JobRow:
    id: str
    user: str
    tier: str
    status: str
    stage: str
    priority: int
    effective_priority: float | None
    progress: float | None  # 0..1; None: not started
    documents: int
    chunks: int
    embedded: int
    to_embed: int | None
    source: str
    collection: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    rate: float = 0.0  # chunks/s, filled in by RateTracker


@dataclass(frozen=True)
class UsageRow:
    user: str
    tier: str
    used_today: int
    reserved: int
    daily_limit: int | None  # None: unlimited
    remaining: int | None
    running: int
    concurrent_limit: int
    waiting: int

    @property
    def fraction_used(self) -> float:
        if not self.daily_limit:
            return 0.0
        return min(1.0, (self.used_today + self.reserved) / self.daily_limit)


@dataclass(frozen=True)
class Snapshot:
    taken_at: dt.datetime
    jobs: list[JobRow]
    usage: list[UsageRow]
    counts: dict[str, int]  # every job in the database by status
    dask_dashboard: str | None
    total_rate: float = 0.0  # chunks/s over all jobs, filled in by RateTracker
    meta: dict[str, Any] = field(default_factory=dict)


def _progress(job: Job) -> float | None:
    if job.status == "succeeded":
        return 1.0
    if job.to_embed:
        return min(1.0, job.embedded / job.to_embed)
    if job.partitions_total:
        return min(1.0, job.partitions_done / job.partitions_total)
    return None if job.status in WAITING_STATUSES and not job.started_at else 0.0


def take_snapshot(
    service: Any,
    *,
    user: str | None = None,
    now: dt.datetime | None = None,
    finished_within: dt.timedelta = dt.timedelta(days=1),
    limit: int = 200,
) -> Snapshot:
    """Everything the dashboard shows, read in one transaction. ``user``: only that user's jobs and usage.

    Effective priorities and quotas are the service's own (:mod:`embedfleet.schedulers.reads`):
    what a user sees here is what ``jobs status`` and ``quota`` say, and what admission decides on.
    """
    reads = service.reads
    now = now or service.clock()
    with reads.session() as session:
        rows = reads.shown_jobs(session, now, user=user, finished_within=finished_within, limit=limit)
        priorities = reads.priorities(session, [job for job, _ in rows], now)
        quotas = reads.user_quotas(session, now, user=user, limit=limit)
        counts = reads.counts_by_status(session, user=user)
        link = session.execute(select(Meta.value).where(Meta.key == DASK_DASHBOARD_KEY)).scalar_one_or_none()

    jobs = [
        JobRow(
            id=job.id,
            user=job.owner,
            tier=tier_of(tier_name).name,
            status=job.status,
            stage=job.stage,
            priority=job.priority,
            effective_priority=eff,
            progress=_progress(job),
            documents=job.documents,
            chunks=job.chunks,
            embedded=job.embedded,
            to_embed=job.to_embed,
            source=job.source,
            collection=job.collection,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=job.error,
        )
        for (job, tier_name), eff in zip(rows, priorities)
    ]
    # Running first, then waiting jobs in the order a dispatcher would pick them, then the rest newest first.
    jobs.sort(
        key=lambda j: (
            _STATUS_ORDER.get(j.status, 9),
            -(j.effective_priority or 0) if j.status in WAITING_STATUSES else 0,
            -(j.finished_at or j.started_at or j.created_at).timestamp(),
        )
    )
    usage = [
        UsageRow(
            user=q.user,
            tier=q.tier,
            used_today=q.used_today,
            reserved=q.reserved,
            daily_limit=q.daily_limit,
            remaining=q.remaining,
            running=q.running,
            concurrent_limit=q.concurrent_limit,
            waiting=q.queued,
        )
        for q in quotas
    ]
    return Snapshot(taken_at=now, jobs=jobs, usage=usage, counts=counts, dask_dashboard=link)


class RateTracker:
    """Chunks/s per job and in total from successive snapshots.

    A job's rate is its embedded chunks over the last ``window`` seconds of snapshots; the
    total is the sum of what every job embedded since the previous snapshot. A resumed job
    starts its count again (its new attempt's ``embedded``): a drop counts as zero, never negative.
    """

    def __init__(self, *, window: float = 10.0, history: int = 900):
        self.window = window
        self._seen: dict[str, collections.deque[tuple[float, int]]] = {}
        self._last: dict[str, int] = {}
        self.history: collections.deque[tuple[dt.datetime, float]] = collections.deque(maxlen=history)
        self._last_time: float | None = None

    def update(self, snapshot: Snapshot, *, monotonic: float) -> Snapshot:
        """``snapshot`` with ``rate`` filled in per job and ``total_rate``; appends to :attr:`history`."""
        delta_total = 0
        jobs = []
        for job in snapshot.jobs:
            samples = self._seen.setdefault(job.id, collections.deque())
            previous = self._last.get(job.id)
            if previous is not None:
                delta_total += max(0, job.embedded - previous)
            self._last[job.id] = job.embedded
            samples.append((monotonic, job.embedded))
            while len(samples) > 2 and monotonic - samples[1][0] >= self.window:
                samples.popleft()
            rate = 0.0
            if job.status == "running" and len(samples) >= 2:
                (t0, e0), (t1, e1) = samples[0], samples[-1]
                if t1 > t0:
                    rate = max(0, e1 - e0) / (t1 - t0)
            jobs.append(replace(job, rate=rate))
        shown = {j.id for j in snapshot.jobs}
        for job_id in list(self._seen):
            if job_id not in shown:
                del self._seen[job_id]
                self._last.pop(job_id, None)
        total = 0.0
        if self._last_time is not None and monotonic > self._last_time:
            total = delta_total / (monotonic - self._last_time)
        self._last_time = monotonic
        self.history.append((snapshot.taken_at, total))
        return replace(snapshot, jobs=jobs, total_rate=total)
